"""fp16 weights and activations (Float16) as one scheme, for GPUs: onnxruntime's float16 converter,
no pre-export pass. The past/present KV tensors become fp16 too (on a GPU the cache stays on the
device in fp16); every other input and output at the graph's edge keeps its type."""

from __future__ import annotations

from typing import Any

from edgelm.config.profile import Float16
from edgelm.quant.base import Scheme


def quantize(state: Any, settings: Float16, progress: Any) -> dict[str, Any]:
    """Convert the graph; ops in keep_fp32_ops stay fp32 with casts around them."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from edgelm.onnx_graph import save_external
    from edgelm_runtime.bundle import ModelIO
    from edgelm.quant.graph import size_mb

    source = state.current_onnx
    model = onnx.load(str(source), load_external_data=True)
    kv = ModelIO()
    edge = [v.name for v in [*model.graph.input, *model.graph.output] if not kv.is_kv(v.name)]
    converted = convert_float_to_float16(model, keep_io_types=edge, op_block_list=list(settings.keep_fp32_ops),
                                         disable_shape_infer=True)
    target = state.work_dir / "float16" / "model.onnx"
    save_external(converted, target)
    state.current_onnx = target
    kept = sorted({n.op_type for n in converted.graph.node if n.op_type in settings.keep_fp32_ops})
    return {"mode": settings.mode, "fp32_ops": kept, "size_mb_before": size_mb(source), "size_mb_after": size_mb(target)}


def label(profile: Any) -> str:
    q = profile.quantization
    return "fp16" + (f" (fp32: {', '.join(q.keep_fp32_ops)})" if q.keep_fp32_ops else "")


def note(facts: dict[str, Any]) -> str:
    kept = f", fp32 kept: {', '.join(facts['fp32_ops'])}" if facts["fp32_ops"] else ""
    return f"fp16 weights, activations and KV cache{kept}, {facts['size_mb_before']} -> {facts['size_mb_after']} MB"


SCHEME = Scheme(mode="float16", quantize=quantize, label=label, note=note,
                adapter_refusal="the float16 converter rewrites the adapter inputs' types (not supported yet)")
