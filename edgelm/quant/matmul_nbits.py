"""The weight-only scheme's ONNX code (its unit is weight_only.py): weight MatMuls to MatMulNBits,
4 or 8 bits in blocks along K, with onnxruntime's MatMulNBitsQuantizer. Activations stay float (at
accuracy_level 4 quantized to int8 per block at run time), so no calibration is needed and an
activation outlier only costs its own block (the weakness of static per-tensor int8)."""

from __future__ import annotations

import contextlib
import io
import logging
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from edgelm.config.profile import WeightOnly
from edgelm.quant.graph import quiet_root_logger, weight_matmuls

logger = logging.getLogger(__name__)


def untie_lm_head(model: onnx.ModelProto) -> list[str]:
    """Replace MatMul(x, Transpose(W)) with MatMul(x, W^T as its own initializer); returns the
    MatMul names changed. The embedding keeps W for its Gather.

    The tied LM head reaches its MatMul through a Transpose of the embedding, which the quantizer
    skips ("MatMul doesn't have const weight": ~113 MB left fp32 on SmolLM2); the embedding Gather
    keeps the original (float, or 4-bit GatherBlockQuantized when `embeddings: int4`). The head and
    the embedding are found from the graph (graph_roles.py: the MatMul producing the logits, the
    Gather on input_ids), so tied and untied heads of every family are treated alike."""
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    changed = []
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] in initializers:
            continue
        transpose = producer.get(node.input[1])
        if transpose is None or transpose.op_type != "Transpose" or transpose.input[0] not in initializers:
            continue
        weight = numpy_helper.to_array(initializers[transpose.input[0]])
        perm = next((list(a.ints) for a in transpose.attribute if a.name == "perm"), None)
        if weight.ndim != 2 or perm not in (None, [1, 0]):
            continue
        name = f"{transpose.input[0]}.untied_t"
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight.T), name))
        initializers[name] = graph.initializer[-1]
        node.input[1] = name
        changed.append(node.name)
    if changed:
        still_used = {name for node in graph.node for name in node.input}
        for node in [n for n in graph.node if n.op_type == "Transpose" and n.output[0] not in still_used]:
            graph.node.remove(node)
    return changed


def select_matmuls(graph: onnx.ModelProto, settings: WeightOnly) -> tuple[list[str], list[str], list[str], bool]:
    """Untie the LM head when it is to be quantized, then split the weight MatMuls by the profile:
    (to quantize, of those at 8 bits, kept float, whether the head is quantized)."""
    from edgelm.graph_roles import GraphRoles

    if settings.lm_head == "quantized":
        untie_lm_head(graph)
    candidates = weight_matmuls(graph)
    head = GraphRoles(graph.graph).head_node()
    heads = {head.name} & set(candidates) if head is not None else set()
    kept = [n for n, module in candidates.items()
            if any(p in module for p in settings.keep_float) or (settings.lm_head == "float" and n in heads)]
    chosen = [n for n in candidates if n not in kept]
    int8 = [n for n in chosen if any(p in candidates[n] for p in settings.keep_int8)]
    return chosen, int8, kept, bool(heads - set(kept))


def _nbits() -> Any:
    """onnxruntime's matmul_nbits_quantizer module. It calls logging.basicConfig(level=INFO) on
    import, which would print every node it skips; a handler already on the root logger stops that."""
    with quiet_root_logger():
        from onnxruntime.quantization import matmul_nbits_quantizer
    # Its one warning here ("opset under 21 ... may not be a valid model") is about the int4 Gather's
    # opset bump; the quality check runs the result, so keep it out of the terminal.
    logging.getLogger(matmul_nbits_quantizer.__name__).setLevel(logging.ERROR)
    return matmul_nbits_quantizer


def _algorithm_config(settings: WeightOnly, block_size: int) -> Any:
    nbits = _nbits()
    if settings.algorithm == "hqq":
        return nbits.HQQWeightOnlyQuantConfig(block_size=block_size, bits=settings.bits, op_types_to_quantize=("MatMul",))
    if settings.algorithm == "k_quant":
        return nbits.KQuantWeightOnlyQuantConfig(op_types_to_quantize=("MatMul",))
    return nbits.DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=settings.symmetric, bits=settings.bits,
                                              accuracy_level=settings.accuracy_level, op_types_to_quantize=("MatMul",))


def _quantize_matmuls(model: onnx.ModelProto, settings: WeightOnly, names: list[str]) -> onnx.ModelProto:
    """MatMulNBits for exactly the MatMuls in `names`, with the settings' bits and algorithm."""
    nbits = _nbits()
    skip = sorted(n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in set(names))
    quantizer = nbits.MatMulNBitsQuantizer(model, bits=settings.bits, block_size=settings.block_size,
                                           is_symmetric=settings.symmetric, accuracy_level=settings.accuracy_level,
                                           nodes_to_exclude=skip, algo_config=_algorithm_config(settings, settings.block_size))
    if settings.algorithm == "k_quant":
        # k-quant reads bits and block size per node from this template (its own default: 4-bit, block 128)
        quantizer.algo_config.customized_weight_config = {
            name: {"bits": settings.bits, "group_size": settings.block_size} for name in names}
    with contextlib.redirect_stdout(io.StringIO()):  # k-quant prints its own progress bar to stdout
        quantizer.process()
    return quantizer.model.model


def quantize_weight_only(model: onnx.ModelProto, settings: WeightOnly, matmuls: list[str],
                         int8_matmuls: list[str] = ()) -> onnx.ModelProto:
    """MatMulNBits for the named weight MatMuls — `int8_matmuls` among them at 8 bits (round to
    nearest, symmetric), the rest at the profile's bits — and the embedding Gather to 4-bit
    GatherBlockQuantized when the profile asks. Returns the new model (weights in memory)."""
    nbits = _nbits()
    result = model
    if int8_matmuls:
        # Block 32 at 8 bits (cpu-int8's setting, perplexity ratio 1.001): finer blocks buy nothing
        # there but scale bytes, and decode of a small model is bound by bytes read per token.
        eight_bit = settings.model_copy(update={"bits": 8, "algorithm": "rtn", "symmetric": True,
                                                "block_size": max(32, settings.block_size)})
        result = _quantize_matmuls(result, eight_bit, list(int8_matmuls))
    result = _quantize_matmuls(result, settings, [n for n in matmuls if n not in set(int8_matmuls)])
    if settings.embeddings == "int4":
        from edgelm.graph_roles import GraphRoles

        embedding = {n.name for n in GraphRoles(result.graph).embedding_nodes()}
        others = [n.name for n in result.graph.node if n.op_type == "Gather" and n.name not in embedding]
        gathers = nbits.MatMulNBitsQuantizer(  # the token embedding only, never a constant table another Gather reads
            result, nodes_to_exclude=others, algo_config=nbits.DefaultWeightOnlyQuantConfig(
                block_size=settings.block_size, is_symmetric=settings.symmetric, bits=4, op_types_to_quantize=("Gather",),
                quant_axes=(("Gather", 1),)))
        gathers.process()
        result = gathers.model.model
    # One accuracy level for every MatMulNBits, whichever algorithm made it (HQQ and k-quant set none:
    # level 0 computes in fp32 after dequantizing, measured 8x slower for 8-bit weights).
    for node in result.graph.node:
        if node.op_type == "MatMulNBits":
            for attribute in [a for a in node.attribute if a.name == "accuracy_level"]:
                node.attribute.remove(attribute)
            if settings.accuracy_level:
                node.attribute.append(onnx.helper.make_attribute("accuracy_level", settings.accuracy_level))
    return result
