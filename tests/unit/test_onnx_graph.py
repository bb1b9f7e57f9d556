"""edgelm.onnx_graph: the ONNX helpers the stages share, and the bundle contract's names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgelm.onnx_graph import count_ops, op_counts, reference_session, save_external
from edgelm_runtime.bundle import MODEL_DATA_FILE, MODEL_FILE, ModelIO


def _graph(weight: np.ndarray) -> onnx.ModelProto:
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("FastGelu", ["h"], ["g"], domain="com.microsoft"),
             helper.make_node("Identity", ["g"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
                              initializer=[numpy_helper.from_array(weight, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def test_op_counts_keep_both_key_styles() -> None:
    model = _graph(np.eye(64, dtype=np.float32))
    assert count_ops(model) == {"MatMul": 1, "FastGelu": 1, "Identity": 1}
    assert op_counts(model) == {"MatMul": 1, "com.microsoft:FastGelu": 1, "Identity": 1}


def test_save_external_writes_one_data_file_and_replaces_a_stale_one(tmp_path: Path) -> None:
    weight = np.arange(64 * 64, dtype=np.float32).reshape(64, 64)
    (tmp_path / MODEL_DATA_FILE).write_bytes(b"stale" * 1000)
    save_external(_graph(weight), tmp_path / MODEL_FILE)
    assert sorted(p.name for p in tmp_path.iterdir()) == [MODEL_FILE, MODEL_DATA_FILE]
    assert (tmp_path / MODEL_DATA_FILE).stat().st_size == weight.nbytes
    loaded = onnx.load(str(tmp_path / MODEL_FILE))
    np.testing.assert_array_equal(numpy_helper.to_array(loaded.graph.initializer[0]), weight)


def test_reference_session_takes_a_path_or_bytes(tmp_path: Path) -> None:
    serialized = _graph(np.eye(64, dtype=np.float32)).SerializeToString()
    save_external(_graph(np.eye(64, dtype=np.float32)), tmp_path / "sub" / MODEL_FILE)  # moves its weights out
    x = np.ones((1, 64), np.float32)
    for source in (tmp_path / "sub" / MODEL_FILE, str(tmp_path / "sub" / MODEL_FILE), serialized):
        session = reference_session(source)
        assert session.get_providers() == ["CPUExecutionProvider"]
        assert session.run(None, {"x": x})[0].shape == (1, 64)


def test_kv_names_follow_the_manifest_templates() -> None:
    io = ModelIO()
    assert io.is_past("past_key_values.0.key") and io.is_past("past_key_values.11.value")
    assert not io.is_past("present.0.key") and io.is_kv("present.3.value")
    for name in ("input_ids", "logits", "past_key_values.x.key", "past_key_values..key", "present.1.keys"):
        assert not io.is_kv(name), name
    custom = ModelIO(past_key="cache.k{i}", past_value="cache.v{i}")
    assert custom.is_past("cache.k7") and not custom.is_past("past_key_values.0.key")
