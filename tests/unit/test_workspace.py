"""Atomic publishing: nothing half-written, nothing overwritten without --force."""

from __future__ import annotations

import pytest

from edgelm.errors import BundleExistsError
from edgelm.pipeline.workspace import Workspace


def _leftovers(folder):
    return [p for p in folder.iterdir() if p.name.startswith(".edgelm-build-")]


def test_failed_build_leaves_nothing(tmp_path):
    out = tmp_path / "bundle"
    with pytest.raises(RuntimeError):
        with Workspace(out) as ws:
            (ws.bundle_dir / "model.onnx").write_text("half")
            raise RuntimeError("stage failed")
    assert not out.exists() and not _leftovers(tmp_path)


def test_publish_moves_the_bundle_into_place(tmp_path):
    out = tmp_path / "bundle"
    with Workspace(out) as ws:
        (ws.bundle_dir / "model.onnx").write_text("new")
        ws.publish()
    assert (out / "model.onnx").read_text() == "new" and not _leftovers(tmp_path)


def test_existing_bundle_needs_force_and_survives_a_failed_rebuild(tmp_path):
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "model.onnx").write_text("old")
    with pytest.raises(BundleExistsError):
        Workspace(out).__enter__()
    with pytest.raises(RuntimeError):
        with Workspace(out, force=True) as ws:
            (ws.bundle_dir / "model.onnx").write_text("new")
            raise RuntimeError("interrupted")
    assert (out / "model.onnx").read_text() == "old"
    with Workspace(out, force=True) as ws:
        (ws.bundle_dir / "model.onnx").write_text("new")
        ws.publish()
    assert (out / "model.onnx").read_text() == "new" and not _leftovers(tmp_path)
