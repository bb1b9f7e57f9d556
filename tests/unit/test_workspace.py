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


def _dead_pid() -> int:
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _fake_workspace(folder, name, **owner):
    import json

    path = folder / f".edgelm-build-{name}"
    (path / "bundle").mkdir(parents=True)
    (path / "bundle" / "model.onnx.data").write_bytes(b"\0" * 1024)
    if owner:
        (path / "owner.json").write_text(json.dumps(owner))
    return path


class TestStaleWorkspaces:
    def test_the_workspace_records_its_owner(self, tmp_path):
        import json
        import os
        import socket

        with Workspace(tmp_path / "bundle") as ws:
            owner = json.loads((ws.root / "owner.json").read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()

    def test_only_workspaces_whose_owner_is_gone_are_removed(self, tmp_path):
        import os
        import socket
        import time

        from edgelm.pipeline.workspace import _start_time, clean_stale, live_workspaces

        host, me = socket.gethostname(), os.getpid()
        dead = _fake_workspace(tmp_path, "dead", pid=_dead_pid(), host=host, started=None)
        reused = _fake_workspace(tmp_path, "reused", pid=me, host=host, started=(_start_time(me) or 0) - 1)
        running = _fake_workspace(tmp_path, "running", pid=me, host=host, started=_start_time(me))
        foreign = _fake_workspace(tmp_path, "foreign", pid=_dead_pid(), host=host + "-other", started=None)
        legacy = _fake_workspace(tmp_path, "legacy")  # an older edgelm: no owner record
        old_legacy = _fake_workspace(tmp_path, "old-legacy")
        day_ago = time.time() - 25 * 3600
        os.utime(old_legacy, (day_ago, day_ago))
        expected = sorted([dead, old_legacy] + ([reused] if _start_time(me) is not None else []))
        assert clean_stale(tmp_path) == expected
        assert all(not p.exists() for p in expected)
        assert running.exists() and foreign.exists() and legacy.exists()
        assert running in live_workspaces(tmp_path) and dead not in live_workspaces(tmp_path)
        assert clean_stale(tmp_path / "missing") == []

    def test_a_build_killed_with_sigkill_is_cleaned_by_the_next_one(self, tmp_path):
        import signal
        import subprocess
        import sys
        from pathlib import Path

        out = tmp_path / "bundle"
        code = ("import sys, time; from pathlib import Path; from edgelm.pipeline.workspace import Workspace; "
                f"ws = Workspace(Path({str(out)!r})).__enter__(); print(ws.root, flush=True); time.sleep(120)")
        child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        root = Path(child.stdout.readline().strip())
        assert root.is_dir() and root.name.startswith(".edgelm-build-")
        child.send_signal(signal.SIGKILL)
        child.wait()
        assert root.exists()  # nothing could clean up
        with Workspace(out) as ws:
            (ws.bundle_dir / "model.onnx").write_text("new")
            ws.publish()
        assert not root.exists() and _leftovers(tmp_path) == []


def test_published_files_get_the_umask_mode(tmp_path):
    import os
    import stat

    out = tmp_path / "bundle"
    with Workspace(out) as ws:
        data = ws.bundle_dir / "model.onnx.data"
        data.write_bytes(b"weights")
        os.chmod(data, 0o600)  # as onnx creates it
        (ws.bundle_dir / "manifest.json").write_text("{}")
        ws.publish()
    normal = stat.S_IMODE((out / "manifest.json").stat().st_mode)
    assert stat.S_IMODE((out / "model.onnx.data").stat().st_mode) == normal
