"""Write each runtime adapter into the bundle and prove it: adapters/NAME.onnx_adapter, then

1. parity: the fp32 reference graph with the adapter active equals PyTorch with peft's adapter
   applied (prefill and one decode step, as the export's own parity check), so the LoRA path is right;
2. quality: the bundle (quantized base + adapter, through edgelm_runtime) against the fp32 model
   with the adapter merged, on the held-out windows of the build's quality check: the same metrics
   (edgelm.eval.metrics.compare) and gates as a merged build's.

`edgelm build --from-bundle B --add-adapter NEW` measures the quality of one adapter the same way
(add_adapter.py); its parity step needs the build's fp32 graph, which a bundle does not keep."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgelm.errors import QualityGateError, StageError
from edgelm.pipeline.results import AdapterFilesResult, AdaptersResult, PackageResult, QualityResult
from edgelm.pipeline.stage import BuildState, Progress
from edgelm.stages.runtime_adapters import (ADAPTER_SUFFIX, ADAPTERS_DIR, RuntimeAdapter, adapter_dtype, peft_applied,
                                            write_adapter_file)
from edgelm_runtime.bundle import RuntimeAdapter as AdapterEntry
from edgelm_runtime.bundle import describe_files, sha256_file

FP16_RTOL = 1e-3  # float16-stored factors: their rounding, relative to the largest logit


def adapter_parity(model: Any, tokenizer: Any, reference_onnx: Path, adapter: RuntimeAdapter, dtype: str,
                   atol: float) -> float:
    """Max |logit difference| of the reference graph + adapter vs PyTorch + peft's adapter (raises past the limit)."""
    from edgelm.onnx_graph import reference_session
    from edgelm.stages.export.decoder import PARITY_TEXT, decoder_feed, io_names, kv_shape, torch_reference

    ids = np.asarray([tokenizer(PARITY_TEXT)["input_ids"][:32]], dtype=np.int64)
    with peft_applied(model, adapter) as wrapped:
        torch_prefill, torch_step = torch_reference(wrapped, ids)
    num_layers, kv_heads, head_dim = kv_shape(model.config)
    _, past_names, _, _ = io_names(num_layers)
    session = reference_session(str(reference_onnx))
    names = {i.name for i in session.get_inputs()}
    params = adapter.parameters(dtype)
    empty = {n: np.zeros((1, kv_heads, 0, head_dim), np.float32) for n in past_names}
    prefill = session.run(None, {**decoder_feed(names, ids[:, :-1], empty), **params})
    step = session.run(None, {**decoder_feed(names, ids[:, -1:], dict(zip(past_names, prefill[1:]))), **params})
    diff = float(max(np.abs(prefill[0] - torch_prefill).max(), np.abs(step[0] - torch_step).max()))
    limit = atol + (FP16_RTOL * float(np.abs(torch_prefill).max()) if dtype == "float16" else 0.0)
    if not np.isfinite(diff) or diff > limit:
        raise StageError("adapter-files", f"adapter {adapter.name}: the graph with it differs from PyTorch with peft's "
                         f"adapter by {diff:.3g} (limit {limit:.3g})", hint="merge it (adapter_mode merge) and report this")
    return diff


def adapter_quality(candidate: Any, model: Any, adapter: RuntimeAdapter, windows: Sequence[list[int]], gates: Any,
                    on_window: Callable[[int], None] = lambda i: None) -> dict[str, Any]:
    """The bundle with `adapter` vs the fp32 model with it merged: the build's metrics and gates."""
    from edgelm.eval.evaluate import TorchModel
    from edgelm.eval.metrics import compare, gate_failures
    from edgelm.stages.adapt import merge_adapters

    merged, _ = merge_adapters(copy.deepcopy(model), [adapter.files], probe=[[0]])
    view, reference = candidate.with_adapter(adapter.name), TorchModel(merged)
    metrics = compare(view, reference, windows, on_window)
    # on a small model the gates alone may pass an adapter that did nothing: its shift must show
    expected = float(np.abs(reference.logits(windows[0]) - TorchModel(model).logits(windows[0])).max())
    shift = float(np.abs(view.logits(windows[0]) - candidate.logits(windows[0])).max())
    if expected > 1e-3 and shift < 0.1 * expected:
        raise StageError("adapter-files", f"adapter {adapter.name}: moves the bundle's logits by {shift:.3g}, the merged "
                         f"model's by {expected:.3g}", hint="the adapter path is not active; report this with --debug")
    metrics.update({"logit_shift": shift, "merged_logit_shift": expected})
    failures = gate_failures(metrics, gates)
    if failures:
        raise QualityGateError("adapter-files", f"adapter {adapter.name}: quality gate failed: " + "; ".join(failures),
                               hint="no bundle was written; use a higher-precision profile or relax quality.* in the recipe")
    return metrics


def write_adapter(bundle: Path, adapter: RuntimeAdapter, dtype: str) -> AdapterEntry:
    """adapters/NAME.onnx_adapter in `bundle`, and its manifest entry (quality still to come)."""
    rel = f"{ADAPTERS_DIR}/{adapter.name}{ADAPTER_SUFFIX}"
    write_adapter_file(bundle / rel, adapter.parameters(dtype))
    spec, config = adapter.files.spec, adapter.files.config
    return AdapterEntry(name=adapter.name, file=rel, sha256=sha256_file(bundle / rel), source_sha256=adapter.files.sha256,
                        rank=adapter.rank, targets=adapter.targets, weight=spec.weight, variant=adapter.files.variant,
                        alpha=None if config.get("lora_alpha") is None else float(config["lora_alpha"]),
                        source=str(adapter.files.folder.resolve()))


def prove(bundle: Path, manifest: Any, adapters: Sequence[RuntimeAdapter], entries: list[AdapterEntry], model: Any,
          tokenizer: Any, reference_onnx: Path | None, plan: Any, provider: str, progress: Progress,
          stage: str = "adapter-files") -> tuple[list[AdapterEntry], dict[str, dict[str, Any]]]:
    """Parity (with a `reference_onnx`) and quality of each adapter (written into `bundle` with
    `entries`); the entries with their quality."""
    import edgelm_runtime

    from edgelm.eval.text import eval_windows

    dtype, settings = adapter_dtype(plan), plan.quality
    windows = eval_windows(settings.eval_text, settings.windows, settings.window_len,
                           lambda text: tokenizer(text, add_special_tokens=False)["input_ids"])
    manifest = dataclasses.replace(manifest, runtime_adapters=tuple(entries), files=describe_files(bundle))
    candidate = edgelm_runtime.load_bundle(bundle, provider=provider, manifest=manifest)
    numbers, done = {}, []
    for adapter, entry in zip(adapters, entries):
        progress(stage, 0, None, f"{adapter.name}: parity and quality")
        parity = {} if reference_onnx is None else {  # --add-adapter: the bundle keeps no fp32 graph
            "parity_max_abs_diff": adapter_parity(model, tokenizer, reference_onnx, adapter, dtype,
                                                  plan.profile.export.parity_atol)}
        metrics = adapter_quality(candidate, model, adapter, windows, settings,
                                  lambda i: progress(stage, i, len(windows), f"{adapter.name}: window {i}/{len(windows)}"))
        quality = {**metrics, **parity, "reference": "fp32 model with the adapter merged (PyTorch)",
                   "measured_on": provider, "eval_text": settings.eval_text, "windows": settings.windows,
                   "window_len": settings.window_len}
        numbers[adapter.name] = quality
        done.append(dataclasses.replace(entry, quality=quality))
    return done, numbers


class PackageAdapters:
    name = "adapter-files"
    title = "Write runtime adapters (adapter files; parity and quality vs each merged fp32 model)"

    def run(self, state: BuildState, progress: Progress) -> AdapterFilesResult:
        kept = getattr(state.result(AdaptersResult), "kept", ())
        if not kept:
            return AdapterFilesResult(skipped="no runtime adapters")
        from edgelm.stages.export.lora import check_lora_kept

        check_lora_kept(state.reference_onnx, state.bundle_dir / "model.onnx", self.name)  # after quantization too
        dtype = adapter_dtype(state.plan)
        entries = [write_adapter(state.bundle_dir, adapter, dtype) for adapter in kept]
        quality = state.result(QualityResult)
        provider = quality.measured_on if quality else "CPUExecutionProvider"
        entries, numbers = prove(state.bundle_dir, state.result(PackageResult).manifest, kept, entries, state.model,
                                 state.tokenizer, state.reference_onnx, state.plan, provider, progress, self.name)
        return AdapterFilesResult(adapters=numbers, entries=tuple(entries))
