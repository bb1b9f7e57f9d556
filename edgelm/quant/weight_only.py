"""Weight-only block quantization (WeightOnly, onnxruntime MatMulNBits) as one scheme: AWQ before
export when activation_aware, MatMulNBits after (matmul_nbits.py), no calibration. At accuracy
level 4 it computes in int8, which only int8 dot products make fast."""

from __future__ import annotations

from typing import Any

from edgelm.config.profile import WeightOnly
from edgelm.quant.base import INT8_DOT_PRODUCT, STAGE, Scheme


def quantize(state: Any, settings: WeightOnly, progress: Any) -> dict[str, Any]:
    """The Quantize stage's step: the profile's weight MatMuls (and embedding) to MatMulNBits."""
    import onnx

    from edgelm.errors import StageError
    from edgelm.onnx_graph import save_external
    from edgelm.quant.graph import size_mb
    from edgelm.quant.matmul_nbits import quantize_weight_only, select_matmuls

    source = state.current_onnx
    graph = onnx.load(str(source), load_external_data=True)
    chosen, int8, kept, head_quantized = select_matmuls(graph, settings)
    if not chosen:
        raise StageError(STAGE, "no weight MatMul left to quantize", hint="check quantization.keep_float in the profile")
    progress(STAGE, 0, None, f"{settings.algorithm} {settings.bits}-bit, {len(chosen)} MatMuls")
    quantized = quantize_weight_only(graph, settings, chosen, int8)
    ops = [n.op_type for n in quantized.graph.node]
    if ops.count("MatMulNBits") != len(chosen):
        raise StageError(STAGE, f"{ops.count('MatMulNBits')} of {len(chosen)} MatMuls became MatMulNBits",
                         hint="report this with --debug; set quantization.keep_float to skip the failing MatMuls")
    target = state.work_dir / "quantized" / "model.onnx"
    save_external(quantized, target)
    state.current_onnx = target
    return {"mode": settings.mode, "bits": settings.bits, "block_size": settings.block_size,
            "symmetric": settings.symmetric, "algorithm": settings.algorithm, "accuracy_level": settings.accuracy_level,
            "quantized_matmuls": len(chosen), "int8_matmuls": len(int8), "kept_float": len(kept), "lm_head_quantized": head_quantized,
            "quantized_embeddings": ops.count("GatherBlockQuantized"),
            "size_mb_before": size_mb(source), "size_mb_after": size_mb(target)}


def label(profile: Any) -> str:
    q = profile.quantization
    compute = "int8 compute" if q.accuracy_level == 4 else "float compute"
    rotated = ", Hadamard-rotated" if q.rotation != "none" else ""
    return f"int{q.bits} weights, block {q.block_size}{'' if q.symmetric else ' asym'}, {compute}{rotated}"


def note(facts: dict[str, Any]) -> str:
    eight = f" ({facts['int8_matmuls']} at 8-bit)" if facts.get("int8_matmuls") else ""
    return (f"{facts['algorithm']} {facts['bits']}-bit block {facts['block_size']}, {facts['quantized_matmuls']} MatMuls"
            f"{eight}{' + embedding' if facts['quantized_embeddings'] else ''}, "
            f"{facts['size_mb_before']} -> {facts['size_mb_after']} MB")


def needs(settings: WeightOnly) -> frozenset[str]:
    # accuracy level 4: activations quantized per block at run time, int8 x int8 dot products
    return frozenset({INT8_DOT_PRODUCT}) if settings.accuracy_level == 4 else frozenset()


SCHEME = Scheme(mode="weight-only", quantize=quantize, label=label, note=note, needs=needs,
                prep={"awq": lambda settings: settings.activation_aware,
                      "rotate": lambda settings: settings.rotation != "none"})
