"""ONNX helpers the compiler's stages share: op counts, saving a graph with its weights in one
external data file, and the plain CPU onnxruntime session that reference computations run on."""

from __future__ import annotations

import collections
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgelm_runtime.bundle import external_data_file

if TYPE_CHECKING:  # onnx and onnxruntime load on first use: importing this module stays cheap
    import onnx

_DEFAULT_DOMAINS = ("", "ai.onnx")


def count_ops(model: Any) -> dict[str, int]:
    """Op type -> number of nodes, whatever the domain ("GroupQueryAttention", "MatMul")."""
    return dict(collections.Counter(node.op_type for node in model.graph.node))


def op_key(node: onnx.NodeProto) -> str:
    """"Op" in the ONNX domain, "domain:Op" elsewhere (as a profile's `allowed_ops` spells them)."""
    return node.op_type if node.domain in _DEFAULT_DOMAINS else f"{node.domain}:{node.op_type}"


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Like `count_ops`, keyed by `op_key` ("com.microsoft:GroupQueryAttention")."""
    return dict(collections.Counter(op_key(node) for node in model.graph.node))


def save_external(model: onnx.ModelProto, target: Path, location: str | None = None) -> None:
    """Save `model` at `target` with every tensor of 1 KiB or more in one data file beside it
    (`location`, default target's name + ".data"). A data file already there is removed first:
    onnx appends to it, which would double it. Tensors already external stay where they point.
    onnx creates the data file 0600 (os.open with that mode): it gets the graph file's mode, which
    is what the umask gives a new file (0644 under 022), like every other file of a bundle."""
    import onnx

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    location = location or external_data_file(target.name)
    (target.parent / location).unlink(missing_ok=True)
    onnx.save_model(model, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=1024)
    data = target.parent / location
    if data.is_file():
        os.chmod(data, stat.S_IMODE(target.stat().st_mode))


def reference_session(model: str | bytes | Path) -> Any:
    """A CPU onnxruntime InferenceSession on a graph (a path, or a serialized model), default
    options with warnings silenced: what parity checks and calibration run the graphs on."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(model) if isinstance(model, Path) else model, options,
                                providers=["CPUExecutionProvider"])
