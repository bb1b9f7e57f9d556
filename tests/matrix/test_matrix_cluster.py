"""`edgelm matrix` on a real two-node Ray cluster started on this machine with `ray start`: a head
(2 CPUs) and a device node (1 CPU, the custom resource device:pi5). The matrix runs as a user runs
it (the CLI, --address); one build worker is killed mid-build; a second run reuses everything; a
failing cell and a Ctrl-C leave the rest to finish."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest

from edgelm_runtime.bundle import verify_bundle
from tests.conftest import save_tiny_model

_RAY = [sys.executable, "-m", "ray.scripts.scripts"]  # the `ray` command of this interpreter, wherever PATH points
_RAY_OPTIONS = ["--object-store-memory=80000000", "--block"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _alive_nodes(address: str) -> int:
    probe = "import ray; ray.init(address=%r, logging_level='ERROR'); print(sum(n['Alive'] for n in ray.nodes()))"
    try:
        result = subprocess.run([sys.executable, "-c", probe % address], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return 0
    return int(result.stdout.strip() or 0) if result.returncode == 0 else 0


@pytest.fixture(scope="module")
def cluster():
    """(address, the device node's id); both nodes stop at the end (ray start --block, then SIGTERM)."""
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths have a 107-byte limit
    port = _free_port()
    address = f"127.0.0.1:{port}"
    # token authentication, as docs/matrix.md sets a cluster up: the same mode and token on every
    # node and in the driver (which inherits os.environ)
    token = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16), "RAY_USAGE_STATS_ENABLED": "0"}
    saved = {key: os.environ.get(key) for key in token}
    os.environ.update(token)
    env = dict(os.environ)
    head = subprocess.Popen([*_RAY, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                             f"--temp-dir={temp}", "--disable-usage-stats", *_RAY_OPTIONS], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    nodes = [head]
    try:
        deadline = time.monotonic() + 120
        while _alive_nodes(address) < 1:
            assert time.monotonic() < deadline and head.poll() is None, "the Ray head did not start"
            time.sleep(1)
        nodes.append(subprocess.Popen([*_RAY, "start", f"--address={address}", "--num-cpus=1",
                                       '--resources={"device:pi5": 1}', *_RAY_OPTIONS], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        while _alive_nodes(address) < 2:
            assert time.monotonic() < deadline and nodes[1].poll() is None, "the device node did not join"
            time.sleep(1)
        yield address
    finally:
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
        for process in reversed(nodes):
            os.killpg(process.pid, signal.SIGTERM)
        for process in reversed(nodes):
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_recipe):
    root = tmp_path_factory.mktemp("matrix-models")
    return [save_tiny_model(root / "tiny-a", seed=0), save_tiny_model(root / "tiny-b", seed=1)], tiny_recipe


def _matrix(folder: Path, models, recipe, profiles, variants, run="[build, bench]", devices="[{name: pi5, resource: device:pi5}]"):
    path = folder / "matrix.yaml"
    path.write_text(f"name: t\nrecipe: {recipe}\nmodels: {[str(m) for m in models]}\nprofiles: {profiles}\n"
                    f"variants: {variants}\nrun: {run}\nbench: {{repeats: 1, warmup: 0, decode_tokens: 8, devices: {devices}}}\n"
                    "eval: {tasks: [sentiment], samples: 8}\n")
    return path


def _command(matrix: Path, out: Path, address: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "edgelm.cli", "matrix", str(matrix), "-o", str(out), "--address", address, *extra]


def _kill_one_build(stop: threading.Event, killed: list[int]) -> None:
    """SIGKILL the first Ray worker seen running a build task, two seconds into it."""
    while not stop.is_set() and not killed:
        for process in psutil.process_iter(["cmdline"]):
            cmdline = " ".join(process.info["cmdline"] or [])
            if cmdline.startswith("ray::build "):
                time.sleep(2)
                if process.is_running():
                    process.kill()
                    killed.append(process.pid)
                return
        time.sleep(0.2)


def test_a_matrix_runs_across_both_nodes_survives_a_killed_worker_and_resumes(cluster, models, tmp_path):
    (model_a, model_b), recipe = models
    matrix = _matrix(tmp_path, [model_a, model_b], recipe, "[cpu-fp32, cpu-int8]", "{prune.mlp_fraction: [0.0, 0.25]}")
    out = tmp_path / "out"
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_one_build, args=(stop, killed), daemon=True)
    killer.start()
    try:
        result = subprocess.run(_command(matrix, out, cluster), capture_output=True, text=True, timeout=900)
    finally:
        stop.set()
    assert result.returncode == 0, result.stdout + result.stderr
    assert killed, "no build worker was seen to kill"
    data = json.loads((out / "matrix.json").read_text())
    cells = data["cells"]
    assert len(cells) == 8 and all(cell["status"] == "done" for cell in cells)
    device_nodes = {node["id"] for node in data["ray"]["nodes"] if "device:pi5" in node["resources"]}
    assert len(data["ray"]["nodes"]) == 2 and len(device_nodes) == 1
    assert {cell["bench"]["pi5"]["node"] for cell in cells} == device_nodes  # every bench on the labelled node
    assert len({cell["build"]["node"] for cell in cells}) == 2                 # builds spread over both nodes
    assert max(cell["build"]["attempt"] for cell in cells) == 2                 # the killed build ran again
    assert not list((out / "bundles").glob(".edgelm-build-*"))               # its workspace is gone
    for cell in cells:
        verify_bundle(Path(cell["bundle"]), check_hashes=True)               # nothing half-written
        assert cell["bench"]["pi5"]["decode_tokens_per_s"] > 0 and cell["build"]["size_mb"] > 0
    assert data["best"]["pi5"]["cell"] in {cell["id"] for cell in cells}
    assert (out / "pareto.png").stat().st_size > 10_000
    assert "best on pi5:" in result.stdout and "8 done" in result.stdout

    stamps = {cell["bundle"]: (Path(cell["bundle"]) / "manifest.json").stat().st_mtime_ns for cell in cells}
    again = subprocess.run(_command(matrix, out, cluster), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    rerun = json.loads((out / "matrix.json").read_text())["cells"]
    assert all(cell["reused"] and cell["status"] == "done" for cell in rerun)
    assert {c["bundle"]: (Path(c["bundle"]) / "manifest.json").stat().st_mtime_ns for c in rerun} == stamps
    assert rerun[0]["bench"] == cells[0]["bench"]  # the earlier numbers, not new ones

    report = subprocess.run([sys.executable, "-m", "edgelm.cli", "matrix", "--report", str(out)], capture_output=True,
                            text=True, timeout=120)
    assert report.returncode == 0 and "best on pi5:" in report.stdout


def test_a_failing_cell_and_ctrl_c_leave_the_others_to_finish(cluster, models, tmp_path):
    (model_a, _), recipe = models
    # an impossible gate: the fp32 bundle's KL against fp32 is ~1e-15, not below 1e-30
    matrix = _matrix(tmp_path, [model_a], recipe, "[cpu-fp32]",
                     "[{name: first}, {name: impossible, quality.max_kl_divergence: 1.0e-30}, {name: third, "
                     "calibration.samples: 4}]", run="[build, eval]")
    out = tmp_path / "out"
    driver = subprocess.Popen(_command(matrix, out, cluster, "--parallel", "1"), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not ((out / "matrix.json").is_file() and
               json.loads((out / "matrix.json").read_text())["cells"][0]["status"] == "done"):
        assert time.monotonic() < deadline and driver.poll() is None, driver.communicate()[0]
        time.sleep(0.5)
    driver.send_signal(signal.SIGINT)
    output = driver.communicate(timeout=120)[0]
    assert driver.returncode == 130, output
    assert "Traceback" not in output and "interrupted" in output
    data = json.loads((out / "matrix.json").read_text())
    assert data["interrupted"] and data["cells"][0]["status"] == "done"
    assert {cell["status"] for cell in data["cells"][1:]} <= {"interrupted", "failed", "done"}

    result = subprocess.run(_command(matrix, out, cluster), capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stdout + result.stderr  # exit 1: a cell failed
    first, impossible, third = json.loads((out / "matrix.json").read_text())["cells"]
    assert first["reused"] and first["status"] == "done"
    assert impossible["status"] == "failed" and "kl" in impossible["build"]["error"].lower()
    assert "\n" not in impossible["build"]["error"] and not Path(impossible["bundle"]).exists()
    assert third["status"] == "done" and Path(third["bundle"], "manifest.json").is_file()
    sentiment = third["eval"]["tasks"]["sentiment-0shot"]
    assert 0 <= sentiment["accuracy"] <= 1 and 0 <= sentiment["reference_accuracy"] <= 1 and third["eval"]["accuracy_drop"] is not None
    assert impossible["eval"]["status"] == "skipped"
    assert "failed: tiny-a/cpu-fp32/impossible (build):" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.parametrize("run, extra, fragments", [
    ("[build]", "resources: {memory_gb: 100000}\n", ["its build needs 100000.0 GiB and the largest Ray node has",
                                                      "memory_gb"]),
    ("[build, bench]", "", ["bench.devices: no node of the Ray cluster has the resource 'device:nowhere'",
                            "ray start --resources"]),
])
def test_what_no_node_can_run_is_refused_before_anything_runs(cluster, models, tmp_path, run, extra, fragments):
    (model_a, _), recipe = models
    matrix = _matrix(tmp_path, [model_a], recipe, "[cpu-fp32]", "[{name: only}]", run=run,
                     devices="[{name: nowhere, resource: device:nowhere}]")
    matrix.write_text(matrix.read_text() + extra)
    result = subprocess.run(_command(matrix, tmp_path / "out", cluster), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stdout + result.stderr
    for fragment in fragments:
        assert fragment in result.stderr
    assert not (tmp_path / "out" / "bundles").exists() and not (tmp_path / "out" / "matrix.json").exists()
