"""Which initializers of a decoder graph are the token embedding, the LM head and the layers.

Read from the graph itself, never from module names (they differ per family): the embedding is
what the Gather (or 4-bit GatherBlockQuantized) on `input_ids` reads, the head is what the MatMul
(MatMulNBits, 1x1 Conv, ...) that produces the logits reads, found by walking back from the logits output
through soft-caps and casts; weights are followed through DequantizeLinear / Transpose / Cast.
A tied head reads the embedding's own initializer: its bytes are counted once, as the embedding."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from edgelm_runtime.bundle import ModelIO

_WEIGHT_PATH = {"DequantizeLinear", "Transpose", "Cast", "Reshape", "Identity", "Squeeze", "Unsqueeze"}
_INDEX_PATH = {"Cast", "Reshape", "Identity", "Squeeze", "Unsqueeze", "Flatten"}
# Conv: the static NPU graphs compute projections as 1x1 convolutions
MATMULS = {"MatMul", "MatMulNBits", "Gemm", "FusedMatMul", "MatMulInteger", "MatMulIntegerToFloat", "Conv"}
_GATHERS = {"Gather", "GatherBlockQuantized"}


class GraphRoles:
    """Lookups over one graph: initializers, producers, and the roles' nodes and weights."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.initializers = {init.name: init for init in graph.initializer}
        self.producer = {out: node for node in graph.node for out in node.output}
        io = ModelIO()
        self.input_ids, self.logits = io.input_ids, io.logits

    def weights(self, name: str, depth: int = 0) -> set[str]:
        """The initializers behind a node input (through dequantize / transpose / cast)."""
        if name in self.initializers:
            return {name}
        node = self.producer.get(name)
        if node is None or node.op_type not in _WEIGHT_PATH or depth > 8:
            return set()
        return set().union(*(self.weights(i, depth + 1) for i in node.input if i))

    def _from_input_ids(self, name: str) -> bool:
        for _ in range(8):
            if name == self.input_ids:
                return True
            node = self.producer.get(name)
            if node is None or node.op_type not in _INDEX_PATH:
                return False
            name = node.input[0]
        return False

    def embedding_nodes(self) -> list[onnx.NodeProto]:
        return [n for n in self.graph.node if n.op_type in _GATHERS and len(n.input) > 1
                and self._from_input_ids(n.input[1]) and self.weights(n.input[0])]

    def head_node(self) -> onnx.NodeProto | None:
        """The MatMul-like node nearest the logits output, walking back through every other op."""
        queue, seen = [self.logits], set()
        while queue:
            name = queue.pop(0)
            node = self.producer.get(name)
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            if node.op_type in MATMULS and len(node.input) > 1 and self.weights(node.input[1]):
                return node
            queue.extend(i for i in node.input if i and i not in self.initializers)
        return None

    def embedding_weights(self) -> set[str]:
        names: set[str] = set()
        for node in self.embedding_nodes():  # data, and GatherBlockQuantized's scales / zero points
            names |= set().union(*(self.weights(i) for i in [node.input[0], *node.input[2:]] if i))
        return names

    def head_weights(self) -> set[str]:
        node = self.head_node()
        if node is None:
            return set()
        return set().union(*(self.weights(i) for i in node.input[1:] if i))


def initializer_bytes(init: onnx.TensorProto) -> int:
    """Stored bytes of one initializer, from its external-data length when its data is outside."""
    if init.data_location == onnx.TensorProto.EXTERNAL:
        length = next((int(e.value) for e in init.external_data if e.key == "length"), None)
        if length is not None:
            return length
    if init.raw_data:
        return len(init.raw_data)
    count = int(np.prod(init.dims)) if init.dims else 1
    if init.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        return (count + 1) // 2
    return count * onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize


def size_split(model: onnx.ModelProto) -> dict[str, Any]:
    """MB of the embedding, the head and the layers (every other initializer) of `model`;
    head_tied: the head reads the embedding's initializer, whose bytes count once, as embedding."""
    roles = GraphRoles(model.graph)
    embedding, head = roles.embedding_weights(), roles.head_weights()
    sizes = {name: initializer_bytes(init) for name, init in roles.initializers.items()}
    tied = bool(head & embedding)
    head_only = head - embedding
    layers = set(sizes) - embedding - head_only
    mb = lambda names: round(sum(sizes[n] for n in names) / 1e6, 3)  # noqa: E731
    return {"embedding_mb": mb(embedding), "layers_mb": mb(layers), "head_mb": mb(head_only), "head_tied": tied}
