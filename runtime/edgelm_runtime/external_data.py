"""Where an ONNX file's tensors keep their weights: every external-data `location`, read from the
file's protobuf bytes without the onnx package (the runtime depends on onnxruntime only, and
onnxruntime has no API that lists them before it opens the files).

onnxruntime opens `location` relative to the graph's folder. Older releases (the runtime allows
>= 1.20) follow an absolute path, `../` or a link out of the folder, so the bundle checks every
location itself (bundle.verify_bundle). A minimal protobuf reader walks only the messages that can
hold a TensorProto: the model's graph, its training graphs and local functions, each graph's nodes,
initializers and sparse initializers, and each node attribute's tensors and subgraphs (If, Loop,
Scan bodies), at any depth. Field numbers from onnx.proto (onnx 1.23, unchanged since they were
added): ModelProto.graph 7, training_info 20, functions 25; TrainingInfoProto.initialization 1,
algorithm 2; GraphProto.node 1, initializer 5, sparse_initializer 15; NodeProto.attribute 5;
FunctionProto.node 7, attribute_proto 11; AttributeProto.t 5, g 6, tensors 10, graphs 11,
sparse_tensor 22, sparse_tensors 23; SparseTensorProto.values 1, indices 2;
TensorProto.external_data 13 (StringStringEntryProto key 1, value 2), data_location 14 (1 = EXTERNAL)."""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from pathlib import Path

_MODEL, _TRAINING, _GRAPH, _NODE, _FUNCTION, _ATTRIBUTE, _SPARSE, _TENSOR = range(8)
# message kind -> {field number: the kind of message that field holds}; every other field is skipped
_CHILDREN = {
    _MODEL: {7: _GRAPH, 20: _TRAINING, 25: _FUNCTION},
    _TRAINING: {1: _GRAPH, 2: _GRAPH},
    _GRAPH: {1: _NODE, 5: _TENSOR, 15: _SPARSE},
    _NODE: {5: _ATTRIBUTE},
    _FUNCTION: {7: _NODE, 11: _ATTRIBUTE},
    _ATTRIBUTE: {5: _TENSOR, 6: _GRAPH, 10: _TENSOR, 11: _GRAPH, 22: _SPARSE, 23: _SPARSE},
    _SPARSE: {1: _TENSOR, 2: _TENSOR},
}
_EXTERNAL_DATA, _DATA_LOCATION, _EXTERNAL = 13, 14, 1


def external_locations(path: Path) -> list[str]:
    """The external-data location of every tensor in the ONNX file at `path`, in file order ("" for
    a tensor marked EXTERNAL that names none). Raises ValueError when the bytes are not protobuf."""
    with open(path, "rb") as handle:
        size = handle.seek(0, 2)
        if size == 0:
            return []
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _walk(data)


def _walk(data: mmap.mmap) -> list[str]:
    found: list[str] = []
    stack = [(_MODEL, 0, len(data))]  # iterative: a hostile file may nest subgraphs deeply
    while stack:
        kind, start, end = stack.pop()
        if kind == _TENSOR:
            found.extend(_tensor_locations(data, start, end))
            continue
        children = _CHILDREN[kind]
        for number, wire, value, stop in _fields(data, start, end):
            if wire == 2 and number in children:
                stack.append((children[number], value, stop))
    return found


def _tensor_locations(data: mmap.mmap, start: int, end: int) -> list[str]:
    """Every `location` entry of a TensorProto (all of them: a reader may take the first or the
    last), or [""] for a tensor marked EXTERNAL without one."""
    locations, external = [], False
    for number, wire, value, stop in _fields(data, start, end):
        if number == _EXTERNAL_DATA and wire == 2:
            entry = dict(_strings(data, value, stop))
            if entry.get("key") == "location":
                locations.append(entry.get("value", ""))
        elif number == _DATA_LOCATION and wire == 0:
            external = value == _EXTERNAL
    return locations or ([""] if external else [])


def _strings(data: mmap.mmap, start: int, end: int) -> Iterator[tuple[str, str]]:
    """A StringStringEntryProto as ("key", k) and ("value", v) pairs."""
    for number, wire, value, stop in _fields(data, start, end):
        if wire == 2 and number in (1, 2):
            yield ("key" if number == 1 else "value"), bytes(data[value:stop]).decode("utf-8", "surrogateescape")


def _fields(data: mmap.mmap, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, value or payload start, payload end) of each field in data[start:end]."""
    pos = start
    while pos < end:
        key, pos = _varint(data, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise ValueError(f"field number 0 at byte {pos}")
        if wire == 0:
            value, pos = _varint(data, pos, end)
            yield number, wire, value, pos
            continue
        if wire == 2:
            length, pos = _varint(data, pos, end)
            stop = pos + length
            if stop > end:
                raise ValueError(f"field {number} runs past its message (byte {pos})")
            yield number, wire, pos, stop
            pos = stop
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        else:  # 3 and 4 (groups) are not in onnx.proto; 6 and 7 do not exist
            raise ValueError(f"wire type {wire} at byte {pos}")
    if pos != end:
        raise ValueError("truncated message")


def _varint(data: mmap.mmap, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise ValueError(f"bad varint at byte {pos}")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
