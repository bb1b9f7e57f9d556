"""The library API that the CLI and tests call: plan_build(), build(), evaluate().

`PHASES` is the whole build, top to bottom, in named phases. The package phase lays the bundle's
files out first, then proves their quality through edgelm_runtime (the code apps run) against
the fp32 export, and only then writes manifest.json, once, from the typed stage results
(edgelm/pipeline/results.py). The workspace publishes the folder atomically at the end."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgelm.config._yaml import validate
from edgelm.config.plan import DEFAULT_MODEL, BuildOverrides, BuildPlan, apply_overrides, resolve
from edgelm.config.profile import DeviceProfile, QualityGates, load_profile
from edgelm.config.recipe import Recipe, load_recipe, parse_adapter
from edgelm.errors import ConfigError, write_error
from edgelm.eval.evaluate import evaluate as measure, gate_misses, raise_missed
from edgelm.hardware import preflight_warnings
from edgelm.pipeline.results import ManifestResult, StageResult, records
from edgelm.pipeline.runner import run_stages
from edgelm.pipeline.stage import BuildState, Progress, no_progress
from edgelm.pipeline.workspace import Workspace
from edgelm.stages.adapt import MergeAdapters
from edgelm.stages.check.device import CheckDevice
from edgelm.stages.check.quality import CheckQuality
from edgelm.stages.compress.awq import ActivationAwareScales
from edgelm.stages.compress.prune import Prune
from edgelm.stages.compress.sensitivity import MeasureSensitivity
from edgelm.stages.encoder.export import ExportEncoder, FuseEncoder
from edgelm.stages.encoder.load import EncoderPreflight, LoadEncoder, checkpoint_task
from edgelm.stages.encoder.package import PackageEncoder, QuantizeEncoder
from edgelm.stages.encoder.quality import CheckEncoderQuality
from edgelm.stages.compress.rotate import Rotate
from edgelm.stages.compress.smooth import Smooth
from edgelm.stages.export.decoder import ExportOnnx
from edgelm.stages.export.static import ExportStatic
from edgelm.stages.load.model import LoadModel, locate_model, looks_like_hub_name, source_fingerprint
from edgelm.stages.optimize import FuseGraph
from edgelm.stages.package import Package, WriteManifest
from edgelm.stages.package_adapters import PackageAdapters
from edgelm.stages.preflight import Preflight, preflight  # noqa: F401  (api.preflight: a plan's inputs alone)
from edgelm.stages.quantize import Quantize
from edgelm_runtime.bundle import Manifest, read_manifest
from edgelm_runtime.hardware import host_features

logger = logging.getLogger(__name__)

PHASES = (
    ("preflight", (Preflight(),)),                  # inputs checked in a second, before any weight loads
    ("load", (LoadModel(),)),                        # fp32 weights from safetensors or GGUF, tokenizer, template
    ("adapt", (MergeAdapters(),)),                   # LoRA adapters merged, checked against the unmerged model
    ("compress", (Prune(), Rotate(), Smooth(), ActivationAwareScales(), MeasureSensitivity())),  # torch-side, before export
    ("export", (ExportOnnx(), ExportStatic())),      # ONNX with a KV cache (+ fixed-shape graphs for NPUs)
    ("optimize", (FuseGraph(),)),                    # onnxruntime's transformer fusions, parity re-checked
    ("quantize", (Quantize(),)),                     # the profile's scheme (edgelm/quant/)
    ("check", (CheckDevice(),)),                     # ops and shapes the device takes
    ("package", (Package(), CheckQuality(), PackageAdapters(), WriteManifest())),  # files, their proven quality
)                                                # (runtime adapters' too), the manifest once
PIPELINE = tuple(stage for _, stages in PHASES for stage in stages)

# Encoder builds (BERT family: --task feature-extraction | sequence-classification | token-classification):
# the same phases, with the encoder's own load, export, quantization and quality stages.
ENCODER_PHASES = (
    ("preflight", (EncoderPreflight(),)),          # task, head, labels and pooling read from the checkpoint
    ("load", (LoadEncoder(),)),                      # fp32 weights (safetensors) with the task's head
    ("adapt", (MergeAdapters(),)),                   # LoRA (and modules_to_save heads) merged, verified
    ("export", (ExportEncoder(),)),                  # dynamic batch and sequence, MultiHeadAttention, parity
    ("optimize", (FuseEncoder(),)),                  # onnxruntime's encoder fusions, parity re-checked
    ("quantize", (QuantizeEncoder(),)),              # the profile's encoder scheme (edgelm/quant/encoder.py)
    ("check", (CheckDevice(),)),                     # ops and shapes the device takes
    ("package", (PackageEncoder(), CheckEncoderQuality(), WriteManifest())),
)
ENCODER_PIPELINE = tuple(stage for _, stages in ENCODER_PHASES for stage in stages)


def pipeline_for(plan: BuildPlan) -> tuple[Any, ...]:
    """The stages that build `plan`: the decoder pipeline, or the encoder one for an encoder task."""
    return PIPELINE if checkpoint_task(plan.model, plan.task, plan.adapters) == "text-generation" else ENCODER_PIPELINE


@dataclass(frozen=True)
class BuildReport:
    output: Path
    manifest: Manifest
    seconds: dict[str, float]
    results: dict[str, StageResult]   # each stage's typed result, in build order

    @property
    def facts(self) -> dict[str, dict[str, Any]]:
        """Each stage's result as the manifest records it (provenance.stages)."""
        return records(self.results)


def plan_build(*, profile: str | None = None, recipe: str | Path | None = None, model: str | None = None,
               name: str | None = None, overrides: BuildOverrides | None = None,
               accuracy_budget: float | None = None, adapters: Sequence[str] | None = None,
               from_bundle: str | Path | None = None, fields: Mapping[str, Any] | None = None,
               source: str = "build options", adapter_mode: str | None = None) -> BuildPlan:
    """Resolve profile + recipe (or a bundle's recorded plan) + options into a BuildPlan.

    Precedence: defaults < profile < recipe < command line; --profile beats the recipe's profile,
    and --adapter (one or more) replaces the recipe's adapter list. `accuracy_budget` (a perplexity
    ratio, e.g. 1.02) becomes the perplexity gate and turns on the mixed-precision search, which
    keeps the fewest MatMuls in fp32 that meet it. Paths given here are made absolute, so the plan
    stored in the manifest rebuilds from anywhere. `fields` are dotted plan fields over everything
    (`{"prune.mlp_fraction": 0.1}`: a matrix variant); `source` names them in a validation error.
    `adapter_mode` ("merge" | "runtime") is the mode of every adapter given or recorded (runtime:
    kept apart and switched at run time, edgelm/stages/runtime_adapters.py)."""
    if overrides is not None and not isinstance(overrides, BuildOverrides):
        raise TypeError(f"overrides: a BuildOverrides, not {type(overrides).__name__} "
                        "(e.g. BuildOverrides(max_seq_len=512, samples=8))")
    if from_bundle is not None and recipe is not None:
        raise ConfigError("--from-bundle and --recipe both give a plan", hint="pass one of them")
    # org/name (not a local path) stays as given: locate_model resolves it in the Hugging Face cache
    merged = {"model": model if model and looks_like_hub_name(model) else _absolute(model),
              **(overrides.plan_fields() if overrides else {}), **(fields or {})}
    if adapter_mode not in (None, "merge", "runtime"):
        raise ConfigError(f"--adapter-mode: expected merge or runtime (got {adapter_mode!r})",
                          hint="merge bakes adapters into the weights; runtime keeps them switchable")
    mode = {"mode": adapter_mode} if adapter_mode else {}
    if adapters:
        merged["adapters"] = [{**parsed, "path": _absolute(parsed["path"]), **mode} for parsed in map(parse_adapter, adapters)]
    if from_bundle is not None:
        plan = _plan_from_bundle(Path(from_bundle), profile, name, merged, accuracy_budget, mode)
        return _adapter_plan(plan, f"{from_bundle}/manifest.json plan")
    loaded = load_recipe(recipe) if recipe else Recipe()
    if mode and "adapters" not in merged:  # --adapter-mode over the recipe's adapters
        merged["adapters"] = [{**a.model_dump(), **mode} for a in loaded.adapters]
    device = load_profile(profile or loaded.profile or "cpu-int8")
    merged["name"] = name
    _budget(merged, device, accuracy_budget)
    return _adapter_plan(resolve(loaded, device, merged, source=source), source)


def _adapter_plan(plan: BuildPlan, source: str) -> BuildPlan:
    """Runtime adapters: distinct names, and the plan their build runs (runtime_adapters.runtime_plan)."""
    from edgelm.config.recipe import check_adapter_names
    from edgelm.stages.runtime_adapters import runtime_plan

    try:
        check_adapter_names(plan.adapters)
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}", hint="name adapters with --adapter PATH@NAME (or name: in a recipe)") from None
    return runtime_plan(plan)


def _plan_from_bundle(bundle: Path, profile: str | None, name: str | None, merged: dict[str, Any],
                      accuracy_budget: float | None, mode: dict[str, str] | None = None) -> BuildPlan:
    """The plan recorded in a bundle's manifest, with the command line over it. The model and the
    adapters must still be the files the bundle was built from (sha256), unless replaced."""
    manifest = read_manifest(bundle)
    if not manifest.plan:
        raise ConfigError(f"{bundle}: the manifest records no build plan (format {manifest.format_version})",
                          hint="rebuild it once with --recipe/--profile; bundles from this edgelm record their plan")
    data = dict(manifest.plan)
    if profile is not None:
        data["profile"] = load_profile(profile).model_dump()
    if name is not None:
        data["name"] = name
    if "adapters" not in merged:  # the recorded adapters, pinned to the recorded weights
        data["adapters"] = [{**spec, **(mode or {})} for spec in _pinned(data.get("adapters", []), manifest)]
    _budget(merged, validate(data["profile"], DeviceProfile, f"{bundle}/manifest.json plan.profile", "profile"),
            accuracy_budget)
    apply_overrides(data, merged)
    plan = validate(data, BuildPlan, f"{bundle}/manifest.json plan", "build")
    recorded_sha = manifest.provenance.get("source", {}).get("sha256")
    if merged.get("model") is None and recorded_sha:
        folder, gguf_file = locate_model(plan.model)
        if source_fingerprint(folder, gguf_file) != recorded_sha:
            raise ConfigError(f"{plan.model}: the model changed since {bundle} was built (sha256 differs)",
                              hint="restore the model, or pass --model to build from the new one (also for a bundle "
                                   "built before edgelm fingerprinted every file it reads)")
    return plan


def _pinned(specs: list[dict[str, Any]], manifest: Manifest) -> list[dict[str, Any]]:
    """Recorded adapter specs with the sha256 they were built from: merged ones in order from
    `adapters`, runtime ones by name from `runtime_adapters` (unpinned where the records disagree)."""
    merged = [s for s in specs if s.get("mode", "merge") == "merge"]
    records = iter(manifest.adapters if len(merged) == len(manifest.adapters) else [{}] * len(merged))
    runtime = {a.name: a.source_sha256 for a in manifest.runtime_adapters}
    return [{**spec, "sha256": next(records).get("sha256") if spec.get("mode", "merge") == "merge"
             else runtime.get(spec.get("name") or Path(spec["path"]).name)} for spec in specs]


def _budget(merged: dict[str, Any], device: Any, accuracy_budget: float | None) -> None:
    if accuracy_budget is None:
        return
    if "mixed_precision" not in type(device.quantization).model_fields:  # the schemes with a mixed-precision search
        raise ConfigError(f"--accuracy-budget needs a static-qdq profile ({device.name} is {device.quantization.mode})",
                          hint="use --profile cpu-w8a8, or leave out --accuracy-budget")
    merged.update({"quality.max_perplexity_ratio": accuracy_budget, "profile.quantization.mixed_precision": "auto"})


def _absolute(path: str | None) -> str | None:
    if path is None or path == DEFAULT_MODEL:
        return path
    return str(Path(path).expanduser().resolve())


def host_warnings(plan: BuildPlan) -> list[str]:
    """Warnings about building `plan` on this machine (shown before the build, never fatal)."""
    return preflight_warnings(plan.profile, host_features())


def build(plan: BuildPlan, output: str | Path, force: bool = False, progress: Progress = no_progress) -> BuildReport:
    """Run PHASES on `plan` into a temporary folder beside `output`, then publish it there (an
    existing bundle only with force=True, and only once the new one is complete)."""
    Workspace(Path(output), force=force).check_output()
    try:
        with Workspace(Path(output), force=force) as workspace:
            state = BuildState(plan=plan, work_dir=workspace.work_dir, bundle_dir=workspace.bundle_dir)
            run_stages(pipeline_for(plan), state, progress)
            published = workspace.publish()
    except OSError as exc:  # creating the temporary folder, the manifest, the final rename
        raise (write_error(exc, str(output)) or exc) from exc
    return BuildReport(output=published, manifest=state.result(ManifestResult).manifest, seconds=dict(state.seconds),
                       results=dict(state.results))


def add_adapter(bundle: str | Path, adapter: str, output: str | Path, force: bool = False,
                progress: Progress = no_progress) -> Manifest:
    """Copy a runtime-adapter bundle to `output` with one more adapter (PATH[:WEIGHT][@NAME]), its
    file, manifest entry and quality numbers, without rebuilding the base (edgelm/stages/add_adapter.py)."""
    from edgelm.stages.add_adapter import add_runtime_adapter

    plan = plan_build(from_bundle=bundle)
    try:
        return add_runtime_adapter(Path(bundle), plan, adapter, Path(output), force, progress)
    except OSError as exc:
        raise (write_error(exc, str(output)) or exc) from exc


@dataclass(frozen=True)
class EvalReport:
    """`edgelm eval`'s numbers (`result`, the --json schema) and the gates they miss (`failures`)."""

    result: dict[str, Any]
    failures: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return not self.failures

    def check(self) -> None:
        """Raise QualityGateError, with the numbers, when a gate was missed."""
        raise_missed(self.result["bundle"], self.failures)


def evaluate(bundle: str | Path, *, reference: str | None = None, windows: int = 8, window_len: int = 256,
             eval_text: str = "builtin", tasks: Sequence[str] = ("sentiment", "topic"), samples: int = 100,
             shots: Sequence[int] = (0, 3), seed: int = 0, provider: str | None = None,
             max_perplexity_ratio: float | None = None, min_top1_agreement: float | None = None,
             max_kl_divergence: float | None = None, max_accuracy_drop: float | None = None,
             check: bool = True, progress: Progress = no_progress,
             formats: Sequence[str] = ("plain",), selection: str = "round-robin",
             embedder: str | Path | None = None, chat_prompts: int = 32, chat_tokens: int = 32,
             min_chat_identical: float | None = None, min_chat_prefix: float | None = None,
             max_chat_kl: float | None = None) -> EvalReport:
    """Measure a bundle against a reference (default: its source model in fp32): perplexity, top-1
    agreement, KL divergence, zero/few-shot task accuracy (in each prompt format of `formats`:
    plain, classify, chat; few-shot examples chosen round-robin or, with selection="nearest", by
    `embedder`'s embeddings), chat fidelity on `chat_prompts` held-out chat prompts (0: skipped);
    then the gates. The gate values are
    validated before anything loads (a bad one fails at once); a missed gate raises QualityGateError
    with the numbers, or with check=False is only listed in the report (report.check() raises later)."""
    gates = validate({"max_perplexity_ratio": max_perplexity_ratio, "min_top1_agreement": min_top1_agreement,
                      "max_kl_divergence": max_kl_divergence, "min_chat_identical": min_chat_identical,
                      "min_chat_prefix": min_chat_prefix, "max_chat_kl": max_chat_kl}, QualityGates, "eval options", "eval")
    if read_manifest(bundle).encoder is not None:  # encoder bundles: their own metrics and gates
        from edgelm.eval.encoder import evaluate_encoder

        result, failures = evaluate_encoder(bundle, reference, eval_text, provider, progress)
        report = EvalReport(result, tuple(failures))
        if check:
            report.check()
        return report
    result = measure(bundle, reference, windows, window_len, eval_text, list(tasks), samples, list(shots), seed,
                     progress=progress, provider=provider, formats=list(formats), selection=selection,
                     embedder=embedder, chat_prompts=chat_prompts, chat_tokens=chat_tokens)
    report = EvalReport(result, tuple(gate_misses(result, gates, max_accuracy_drop)))
    if check:
        report.check()
    return report


def matrix(path: str | Path, output: str | Path, *, address: str | None = None, parallel: int | None = None,
           progress: Any = None) -> dict[str, Any]:
    """Run a matrix file (edgelm/config/matrix.py) on Ray: every cell's build, eval and bench that
    has no up-to-date result in `output`; returns what OUT/matrix.json holds. Needs `edgelm[matrix]`.
    `address`: a Ray cluster (default RAY_ADDRESS, else a local instance); `parallel` caps the builds
    in flight; `progress` is called with the results after every step."""
    from edgelm.matrix.driver import run_matrix

    return run_matrix(path, output, address=address, parallel=parallel, progress=progress)
