"""The build's first stage: check the user's inputs before any heavy work, so a typo fails in a
second, not a minute in. The model (a path or a cached org/name: no model-folder code, sizes that
match the weights' headers, a tokenizer.json that encodes ordinary text), its family and context, the
pruning against the model's shape, the adapters' files, the calibration file and the eval text;
and this machine's CPU features, which the manifest records as provenance.build_host."""

from __future__ import annotations

from pathlib import Path

from edgelm.config.plan import BuildPlan
from edgelm.pipeline.results import PreflightResult
from edgelm.pipeline.stage import BuildState, Progress


def preflight(plan: BuildPlan) -> PreflightResult:
    """Check `plan`'s inputs (the load stage reads the model config again, cached)."""
    from edgelm.arch import for_config
    from edgelm.calibration import read_calibration_file
    from edgelm.eval.text import load_eval_text
    from edgelm.stages.adapt import read_adapters
    from edgelm.stages.compress.prune import check_prune_fits
    from edgelm.stages.load.model import check_tokenizer_file, context_length, locate_model, model_config

    folder, gguf_file = locate_model(plan.model)
    config = model_config(plan.model)  # refuses auto_map code and sizes the weights do not have
    check_tokenizer_file(folder, gguf_file)
    family = for_config(config, str(folder / gguf_file if gguf_file else folder)).name
    context = context_length(config, plan.max_seq_len, plan.model)
    if plan.prune is not None:
        check_prune_fits(plan.prune, config)
    adapters = read_adapters(plan.adapters)
    if plan.calibration.source != "builtin":
        read_calibration_file(Path(plan.calibration.source))
    load_eval_text(plan.quality.eval_text)
    return PreflightResult(family=family, context=context, adapters=len(adapters), calibration=plan.calibration.source)


class Preflight:
    name = "preflight"
    title = "Check the inputs (model, family, context, adapters, calibration, eval text)"

    def run(self, state: BuildState, progress: Progress) -> PreflightResult:
        from edgelm_runtime.hardware import host_features

        result = preflight(state.plan)
        state.build_host = host_features()
        return result
