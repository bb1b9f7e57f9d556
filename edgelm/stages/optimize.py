"""Fuse the graph for the profile with onnxruntime's transformer optimizer.

On the dynamo export of a Llama-family decoder it fuses RMSNorm into SimplifiedLayerNormalization
and residual-Add + RMSNorm into SkipSimplifiedLayerNormalization; rotary and attention fusions
are counted when its patterns match. The profile lists the fused ops it requires; a missing one
fails the build by name. Parity with the unfused export is checked again."""

from __future__ import annotations

import collections
import logging
from pathlib import Path
from typing import Any

import numpy as np

from edgelm.errors import StageError
from edgelm.onnx_graph import count_ops  # noqa: F401  (edgelm.stages.optimize.count_ops: tests and benchmarks use it)
from edgelm.pipeline.results import AdaptersResult, FuseResult
from edgelm.pipeline.stage import BuildState, Progress
from edgelm.stages.export.decoder import PARITY_TEXT, kv_shape, onnx_logits
from edgelm_runtime.bundle import MODEL_FILE

logger = logging.getLogger(__name__)


def fuse(source: Path, target: Path, config: Any) -> dict[str, int]:
    from onnxruntime.transformers.optimizer import optimize_model

    # model_type "gpt2" selects the decoder fusion passes (norms, rotary, attention); opt_level 0
    # keeps the graph free of CPU-specific layout rewrites so quantization still sees MatMuls.
    optimized = optimize_model(str(source), model_type="gpt2", num_heads=config.num_attention_heads,
                               hidden_size=config.hidden_size, opt_level=0, use_gpu=False)
    target.parent.mkdir(parents=True, exist_ok=True)
    optimized.save_model_to_file(str(target), use_external_data_format=True, all_tensors_to_one_file=True)
    fused = {op: n for op, n in optimized.get_fused_operator_statistics().items() if n}
    # fused ops made before this stage count too (the fused export emits GroupQueryAttention itself)
    made_earlier = collections.Counter(n.op_type for n in optimized.model.graph.node if n.domain == "com.microsoft")
    fused.update({op: n for op, n in made_earlier.items() if op not in fused})
    return fused


class FuseGraph:
    name = "fuse"
    title = "Fuse graph (onnxruntime.transformers optimizer)"

    def run(self, state: BuildState, progress: Progress) -> FuseResult:
        settings = state.plan.profile.fusions
        if not settings.enabled:
            return FuseResult(fused={}, skipped="fusions disabled by the profile")
        target = state.work_dir / "fused" / MODEL_FILE
        fused = fuse(state.current_onnx, target, state.model.config)
        missing = [op for op in settings.required if fused.get(op, 0) == 0]
        if missing:
            raise StageError(self.name, f"required fusion {', '.join(missing)} did not happen (fused: {fused or 'nothing'})",
                             hint="this graph does not match onnxruntime's fusion patterns; use a profile without that requirement")
        ids = np.asarray([state.tokenizer(PARITY_TEXT)["input_ids"][:32]], dtype=np.int64)
        kv = kv_shape(state.model.config)
        ref_prefill, ref_step = onnx_logits(state.reference_onnx, ids, kv)
        new_prefill, new_step = onnx_logits(target, ids, kv)
        diff = float(max(np.abs(ref_prefill - new_prefill).max(), np.abs(ref_step - new_step).max()))
        if not np.isfinite(diff) or diff > state.plan.profile.export.parity_atol:
            raise StageError(self.name, f"fused graph differs from the export by {diff:.3g}",
                             hint="disable fusions in the profile (fusions.enabled: false) and report this")
        if getattr(state.result(AdaptersResult), "kept", ()):  # runtime adapters: their path must survive fusion
            from edgelm.stages.export.lora import check_lora_kept

            check_lora_kept(state.reference_onnx, target, self.name)
        state.current_onnx = target
        return FuseResult(fused=fused, max_abs_diff_vs_export=diff)
