"""Every file of a bundle gets the mode a new file gets under the umask (0644 under 022): onnx
writes external data 0600, which left model.onnx.data unreadable to other users of a shared bundle."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield 0o644
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_save_external_writes_the_data_file_like_the_graph(tmp_path, umask_022):
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from edgelm.onnx_graph import save_external

    weight = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], [weight])
    save_external(helper.make_model(graph), tmp_path / "model.onnx")
    assert _mode(tmp_path / "model.onnx.data") == _mode(tmp_path / "model.onnx") == umask_022


def test_every_file_of_a_built_bundle_has_the_same_mode(tiny_bundle):
    umask = os.umask(0o022)
    os.umask(umask)
    modes = {path.relative_to(tiny_bundle).as_posix(): oct(_mode(path)) for path in tiny_bundle.rglob("*") if path.is_file()}
    assert "model.onnx.data" in modes
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes
