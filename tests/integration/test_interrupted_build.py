"""A real `edgelm build` subprocess killed mid-build (SIGTERM, SIGINT): no partial bundle, no
temporary folder left, and the previous bundle at the same path untouched and still loadable (or,
if the signal lands after the one-rename publish, the new bundle complete)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import edgelm_runtime as er


@pytest.mark.parametrize(("sig", "after"), [(signal.SIGTERM, 0.0), (signal.SIGINT, 1.0), (signal.SIGTERM, 2.5)])
def test_killed_build_leaves_the_previous_bundle_alone(sig, after, tiny_bundle, tiny_model_dir, tiny_recipe, tmp_path):
    out = Path(shutil.copytree(tiny_bundle, tmp_path / "dist" / "bundle"))
    before = (out / "manifest.json").read_bytes()
    build = subprocess.Popen([sys.executable, "-m", "edgelm.cli", "build", "--profile", "cpu-int8", "--model",
                              str(tiny_model_dir), "--recipe", str(tiny_recipe), "-o", str(out), "--force"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not list(out.parent.glob(".edgelm-build-*")):  # the build is under way (past the imports)
        assert build.poll() is None and time.monotonic() < deadline, build.communicate()[0]
        time.sleep(0.02)
    time.sleep(after)
    if build.poll() is not None:
        pytest.skip(f"the build finished within {after} s on this machine; nothing to interrupt")
    build.send_signal(sig)
    output, _ = build.communicate(timeout=120)
    assert build.returncode in (130, 143), output
    assert "Traceback" not in output
    after_kill = (out / "manifest.json").read_bytes()
    if "bundle written" not in output:  # interrupted before publishing: the old bundle, byte for byte
        assert after_kill == before and json.loads(before)["profile"] == "cpu-fp32"
    else:  # the signal came after the one-rename publish: the new bundle, complete
        assert json.loads(after_kill)["profile"] == "cpu-int8"
    er.load_bundle(out, verify=True).generate("hello", max_new_tokens=2)
    assert not list(out.parent.glob(".edgelm-build-*"))  # the temporary folder is gone


@pytest.mark.parametrize("after", [0.1, 0.25, 0.5])
def test_ctrl_c_while_the_command_starts_is_quiet(after, tmp_path):
    """Ctrl-C during the CLI's own imports (the first half second): "interrupted", exit 130, no
    traceback from deep inside importlib, nothing written."""
    command = subprocess.Popen([sys.executable, "-c", "from edgelm._launch import main; main()", "build",
                                "-o", str(tmp_path / "out")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(after)
    command.send_signal(signal.SIGINT)
    _, errors = command.communicate(timeout=120)
    assert command.returncode == 130 and "Traceback" not in errors and "interrupted" in errors, errors
    assert list(tmp_path.iterdir()) == []



def test_ctrl_c_inside_exec_of_a_string_still_exits_130(tmp_path):
    """CPython treats a KeyboardInterrupt leaving exec("...") as unhandled and, under `python -m`,
    kills the process with SIGINT (-2) at exit after `interrupted` was printed, unless the CLI
    exits itself (dataclasses and typing run exec() while importing: a Ctrl-C early in a build)."""
    (tmp_path / "ctrl_c_app.py").write_text(
        "import typer\nfrom edgelm._cli_base import reports_errors, run\napp = typer.Typer()\n"
        "@app.command()\n@reports_errors\ndef go() -> None:\n    exec('raise KeyboardInterrupt')\nrun(app)\n")
    command = subprocess.run([sys.executable, "-m", "ctrl_c_app"], cwd=tmp_path, capture_output=True, text=True,
                             timeout=120, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert command.returncode == 130 and command.stderr.strip() == "interrupted", (command.returncode, command.stderr)
