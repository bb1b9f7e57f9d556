"""Give an exported decoder graph a runtime LoRA path on each adapted projection: y = x W (+ b) + x A B.

A and B are optional graph inputs named after the module ("layers.3.<block>.<projection>.lora_A",
"...lora_B"), so every adapter of a bundle feeds the same names; their defaults are initializers
of the same names with an empty rank dimension (A (in, 0), B (0, out)), so without an adapter the
path adds exact zeros and the graph computes the base model. The rank dimension is symbolic: an
adapter of any rank fits. This is the graph onnxruntime-genai's builder and Olive's ExtractAdapters
pass make for `RunOptions.add_active_adapter`; the scale (alpha / r, rsLoRA, the adapter's weight)
is folded into B by the writer of the adapter file.

A graph that packs projections (the fused route's q/k/v and gate/up) gets one path per member,
concatenated in the packed order; a member no adapter targets still gets (empty) inputs, so a
later adapter may target it. Stored in float16 (quantized bases) the inputs are cast to fp32 in the
graph: the LoRA MatMuls compute in fp32 over the quantized base. Node names start with
quant.graph.LORA_PREFIX: fusion leaves them alone and every quantizer excludes them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgelm.quant.graph import LORA_PREFIX, is_lora, weight_matmuls

LORA_A, LORA_B = ".lora_A", ".lora_B"


@dataclass(frozen=True)
class LoraSite:
    """One graph MatMul that gets a LoRA path: `module` is its module path; `members` the
    (module, output width) of the projections it computes, in order (one unless packed)."""

    module: str
    members: tuple[tuple[str, int], ...]


def input_names(module: str) -> tuple[str, str]:
    return module + LORA_A, module + LORA_B


def lora_inputs(graph: onnx.GraphProto) -> dict[str, tuple[int, int, int]]:
    """{module: (in features, out features, element type)} of the LoRA inputs a graph has."""
    shapes = {v.name: v.type.tensor_type for v in graph.input}
    found = {}
    for name, tensor in shapes.items():
        if name.endswith(LORA_A) and name[: -len(LORA_A)] + LORA_B in shapes:
            module = name[: -len(LORA_A)]
            out = shapes[module + LORA_B].shape.dim[1].dim_value
            found[module] = (tensor.shape.dim[0].dim_value, out, tensor.elem_type)
    return found


def add_lora_paths(model: onnx.ModelProto, sites: list[LoraSite], dtype: str) -> int:
    """Insert the paths in place; returns the number of LoRA inputs pairs added."""
    graph = model.graph
    elem = TensorProto.FLOAT16 if dtype == "float16" else TensorProto.FLOAT
    nodes = {n.name: n for n in graph.node}
    by_module = {module: nodes[name] for name, module in weight_matmuls(model).items()}
    initializers = {init.name: init for init in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    added = 0
    for site in sites:
        matmul = by_module[site.module]
        width = initializers[matmul.input[1]].dims[0]
        anchor = matmul.output[0]
        after = consumers.get(anchor, [])
        if len(after) == 1 and after[0].op_type == "Add" and any(i in initializers for i in after[0].input):
            anchor = after[0].output[0]  # after the bias Add: MatMul + bias keeps its fusable shape
        prefix = f"{LORA_PREFIX}{site.module}"
        deltas, new_nodes = [], []
        for module, out in site.members:
            a, b = input_names(module)
            rank = f"{module}.rank"
            graph.input.extend([helper.make_tensor_value_info(a, elem, [width, rank]),
                                helper.make_tensor_value_info(b, elem, [rank, out])])
            np_type = np.float16 if elem == TensorProto.FLOAT16 else np.float32
            graph.initializer.extend([numpy_helper.from_array(np.zeros((width, 0), np_type), a),
                                      numpy_helper.from_array(np.zeros((0, out), np_type), b)])
            step = f"{LORA_PREFIX}{module}"
            if elem == TensorProto.FLOAT16:  # stored small, computed in fp32
                new_nodes += [helper.make_node("Cast", [a], [f"{step}/A_fp32"], name=f"{step}/CastA", to=TensorProto.FLOAT),
                              helper.make_node("Cast", [b], [f"{step}/B_fp32"], name=f"{step}/CastB", to=TensorProto.FLOAT)]
                a, b = f"{step}/A_fp32", f"{step}/B_fp32"
            new_nodes += [helper.make_node("MatMul", [matmul.input[0], a], [f"{step}/xA"], name=f"{step}/MatMulA"),
                          helper.make_node("MatMul", [f"{step}/xA", b], [f"{step}/delta"], name=f"{step}/MatMulB")]
            deltas.append(f"{step}/delta")
            added += 1
        if len(deltas) > 1:
            new_nodes.append(helper.make_node("Concat", deltas, [f"{prefix}/delta"], name=f"{prefix}/Concat", axis=-1))
            deltas = [f"{prefix}/delta"]
        # the producer's output is renamed, the Add takes its old name: consumers and graph outputs stay
        producer = next(n for n in graph.node if anchor in n.output)
        base = f"{prefix}/base"
        producer.output[list(producer.output).index(anchor)] = base
        new_nodes.append(helper.make_node("Add", [base, deltas[0]], [anchor], name=f"{prefix}/Add"))
        index = list(graph.node).index(producer) + 1
        for offset, node in enumerate(new_nodes):
            graph.node.insert(index + offset, node)
    _drop_value_info(graph)
    return added


def _drop_value_info(graph: onnx.GraphProto) -> None:
    """Shapes recorded for renamed outputs would be stale; shape inference recomputes them."""
    produced = {out for node in graph.node if is_lora(node) for out in node.output}
    keep = [v for v in graph.value_info if v.name not in produced]
    del graph.value_info[:]
    graph.value_info.extend(keep)


def lora_nodes(graph: onnx.GraphProto) -> dict[str, int]:
    """Op type -> count of the LoRA path's nodes (the stages after export check they survive)."""
    counts: dict[str, int] = {}
    for node in graph.node:
        if is_lora(node):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def check_lora_kept(reference: Path, graph: Path, stage: str) -> None:
    """A stage after the export must leave every LoRA input and MatMul in place (fusion, quantizers)."""
    from edgelm.errors import StageError

    before, after = (onnx.load(str(p), load_external_data=False).graph for p in (reference, graph))
    kept = set(lora_inputs(after)) == set(lora_inputs(before))
    matmuls = lora_nodes(after).get("MatMul", 0) == lora_nodes(before).get("MatMul", 0)
    if not (kept and matmuls):
        raise StageError(stage, f"the runtime adapters' LoRA path did not survive ({len(lora_inputs(after))} of "
                         f"{len(lora_inputs(before))} input pairs, {lora_nodes(after).get('MatMul', 0)} MatMuls left)",
                         hint="report this with --debug; merge the adapters (adapter_mode merge) meanwhile")
