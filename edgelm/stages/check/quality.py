"""Check the finished bundle against the unquantized fp32 export on held-out text.

Both are loaded through edgelm_runtime — the code apps run — so what is measured is what ships.
The fp32 export becomes a small reference bundle in the work folder (same tokenizer). Recipe
gates (max_perplexity_ratio, min_top1_agreement) fail the build with the numbers."""

from __future__ import annotations

from typing import Any

from edgelm.errors import ConfigError, QualityGateError
from edgelm.eval.chat_fidelity import chat_fidelity, chat_gate_failures, held_out_prompt_ids
from edgelm.eval.metrics import compare
from edgelm.eval.text import eval_windows, fingerprint
from edgelm.pipeline.results import PackageResult, QualityResult
from edgelm.pipeline.stage import BuildState, Progress
from edgelm.eval.metrics import gate_failures
from edgelm.stages.package import assemble_bundle, session_options


class CheckQuality:
    name = "quality"
    title = "Check quality vs fp32 reference (perplexity, top-1 agreement, chat answers)"

    def run(self, state: BuildState, progress: Progress) -> QualityResult:
        import edgelm_runtime

        settings = state.plan.quality
        if settings.window_len > state.max_seq_len:
            raise ConfigError(f"quality.window_len {settings.window_len} exceeds max_seq_len {state.max_seq_len}",
                              hint=f"set quality.window_len to at most {state.max_seq_len}")
        windows = eval_windows(settings.eval_text, settings.windows, settings.window_len,
                               lambda text: state.tokenizer(text, add_special_tokens=False)["input_ids"])
        reference_dir = state.work_dir / "reference"
        assemble_bundle(reference_dir, state.reference_onnx, state, f"{state.plan.name}-fp32-reference", "reference",
                        "CPUExecutionProvider", session_options(state), provenance={})
        state.reference_bundle = reference_dir
        # a bundle for a device this machine lacks (CUDA, QNN) is checked on the CPU provider,
        # and the manifest says so: the numbers are the graph's, not the device's
        import onnxruntime

        provider = state.plan.profile.provider
        measured_on = provider if provider in onnxruntime.get_available_providers() else "CPUExecutionProvider"
        # the bundle as packaged, opened with its manifest before that is written (once, last)
        candidate = edgelm_runtime.load_bundle(state.bundle_dir, provider=measured_on,
                                               manifest=state.result(PackageResult).manifest)
        reference = edgelm_runtime.load_bundle(reference_dir)
        metrics = compare(candidate, reference, windows,
                          on_window=lambda i: progress(self.name, i, len(windows), f"window {i}/{len(windows)}"))
        metrics.update({"provider": provider, "measured_on": measured_on, "eval_text": settings.eval_text, "windows": settings.windows,
                        "window_len": settings.window_len, "windows_sha256": fingerprint(windows)})
        if settings.chat_prompts:
            metrics["chat"] = self._chat(candidate, reference, settings, progress)
        failures = gate_failures(metrics, settings) + chat_gate_failures(metrics.get("chat"), settings)
        if failures:
            hint = "no bundle was written; use a higher-precision profile or relax quality.* in the recipe"
            prune = state.plan.prune
            if prune is not None and prune.kind == "structured" and prune.recover is None:
                # measured: a pruned, unrecovered model quantizes worse; distillation restores it (docs/pruning.md)
                hint += ", or recover the pruned model first (prune.recover: {steps: 300})"
            raise QualityGateError(self.name, "quality gate failed: " + "; ".join(failures), hint=hint)
        return QualityResult(**metrics)

    def _chat(self, candidate: Any, reference: Any, settings: Any, progress: Progress) -> dict[str, Any]:
        """Chat fidelity on the held-out chat prompts, rendered by the bundle's own chat template."""
        prompts = held_out_prompt_ids(candidate, settings.chat_prompts, settings.chat_tokens)
        return chat_fidelity(candidate, reference, prompts, settings.chat_tokens,
                             on_prompt=lambda i: progress(self.name, i, len(prompts), f"chat {i}/{len(prompts)}"))
