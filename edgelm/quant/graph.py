"""ONNX graph helpers every scheme's pass shares: which MatMuls carry weights (and the PyTorch
module each came from), where a quantized graph is saved and how big it is. Kept apart from the
schemes so that no scheme imports another (static QDQ and weight-only both need them)."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import onnx


# Nodes of a runtime LoRA path (edgelm/stages/export/lora.py) are named "lora/<module>/...": their
# second inputs are graph inputs with empty defaults (the adapter's A and B), not weights, so every
# scheme leaves them float on top of the quantized base (QLoRA-style).
LORA_PREFIX = "lora/"


def is_lora(node: onnx.NodeProto) -> bool:
    return node.name.startswith(LORA_PREFIX)


def weight_matmuls(model: onnx.ModelProto) -> dict[str, str]:
    """{node name: module path} of MatMuls with a constant weight, e.g. "layers.3.mlp.<projection>".
    An online Hadamard rotation's MatMuls (quant/rotation.py) and a LoRA path's are not weights: they stay float."""
    from edgelm.quant.rotation import ROTATION_MODULE

    initializers = {init.name for init in model.graph.initializer if ROTATION_MODULE not in init.name}
    return {n.name: module_path(n) for n in model.graph.node
            if n.op_type == "MatMul" and n.input[1] in initializers and not is_lora(n)}


def module_path(node: onnx.NodeProto) -> str:
    """The PyTorch module a node came from, read from the dynamo exporter's "namespace" metadata."""
    namespace = next((p.value for p in node.metadata_props if p.key == "namespace"), "")
    modules = [part.split(":")[0].strip() for part in namespace.split("/") if "torch.nn.modules" in part]
    if not modules:
        return node.name
    return relative_module(modules[-1])  # the export wrapper's and the HF model's prefixes, then "layers.3.mlp.<projection>"


def relative_module(path: str) -> str:
    """A module path from "layers." on ("<prefix>.layers.3.<block>.<projection>" -> "layers.3.<block>.<projection>"), as
    graph nodes and adapter tensors both name it."""
    return path[path.index("layers."):] if "layers." in path else path


@contextlib.contextmanager
def quiet_root_logger():
    """onnxruntime.quantization logs advice and calls logging.basicConfig on the root logger; a
    handler already there keeps both out of the terminal."""
    root, guard = logging.getLogger(), logging.NullHandler()
    root.addHandler(guard)
    try:
        yield
    finally:
        root.removeHandler(guard)


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.iterdir() if p.is_file())


def size_mb(path: Path) -> float:
    """The size of the folder holding `path` (a graph and its external data), in MB to 0.1."""
    return round(folder_size(path) / 1e6, 1)
