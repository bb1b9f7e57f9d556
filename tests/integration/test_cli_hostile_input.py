"""What an outside probe sent the CLI (round 2): invalid bytes and a 5 MB line in `edgelm chat`
refuse that turn only, `edgelm generate` with invalid bytes is one line, an empty API key is
refused, and `edgelm clean` removes what a killed build left behind."""

from __future__ import annotations

import os
import subprocess
import sys

from edgelm.cli import app
from edgelm.pipeline.workspace import Workspace
from tests.integration.test_cli import _assert_clean_error, _run, runner

EDGELM = [sys.executable, "-c", "from edgelm._launch import main; main()"]


def _chat(bundle, stdin: bytes) -> subprocess.CompletedProcess:
    return subprocess.run([*EDGELM, "chat", str(bundle), "-n", "4"], input=stdin, capture_output=True, timeout=120)


def test_invalid_bytes_in_a_chat_line_refuse_that_turn_only(tiny_bundle):
    done = _chat(tiny_bundle, b"hi\n\xff\xfe\nhello\n/exit\n")
    out = " ".join((done.stdout.decode("utf-8", "replace") + done.stderr.decode("utf-8", "replace")).split())
    assert done.returncode == 0, out
    assert "Traceback" not in out and out.count("bot>") == 2  # the turns before and after are answered
    assert "messages[2].content is not valid Unicode: a lone surrogate U+DCFF at character 0" in out


def test_a_5mb_chat_line_is_refused_for_that_turn_only(tiny_bundle):
    done = _chat(tiny_bundle, b"x" * 5_000_000 + b"\nhello\n/exit\n")
    out = " ".join((done.stdout.decode() + done.stderr.decode()).split())  # rich wraps at 80 columns in a pipe
    assert done.returncode == 0, out[-2000:]
    assert "the messages hold 5000000 characters; a prompt holds at most 1048576" in out
    assert out.count("bot>") == 1 and "hostile" not in out  # the input is too long; the template is fine


def test_generate_with_invalid_bytes_is_one_line(tiny_bundle):
    done = subprocess.run([*EDGELM, "generate", str(tiny_bundle), b"a\xff", "-n", "4"], capture_output=True, timeout=120)
    err = done.stderr.decode()
    assert done.returncode == 2 and "Traceback" not in err
    assert err.splitlines()[0] == "error: the text is not valid Unicode: a lone surrogate U+DCFF at character 1"


def test_an_empty_api_key_is_refused_not_read_as_no_authentication(tiny_bundle, monkeypatch):
    _assert_clean_error(_run("serve", str(tiny_bundle), "--api-key", ""), "--api-key (or EDGELM_API_KEY) is empty")
    for empty in ("", "  "):
        monkeypatch.setenv("EDGELM_API_KEY", empty)
        result = runner.invoke(app, ["serve", str(tiny_bundle)])
        _assert_clean_error(result, "would serve without authentication")
        assert "serving" not in result.output  # refused before the bundle loads


def test_clean_removes_a_killed_builds_folder_and_keeps_a_running_one(tmp_path):
    killed = subprocess.run([sys.executable, "-c", (
        "import os, sys; from pathlib import Path; from edgelm.pipeline.workspace import Workspace\n"
        f"w = Workspace(Path({str(tmp_path / 'out')!r})).__enter__(); (w.work_dir / 'big').write_bytes(b'0' * 4096)\n"
        "os.kill(os.getpid(), 9)")], cwd=os.getcwd())
    assert killed.returncode == -9
    left = list(tmp_path.glob(".edgelm-build-*"))
    assert len(left) == 1
    result = _run("clean", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert f"removed {left[0]}" in result.output and "1 stale build folder(s) removed" in result.output
    assert not left[0].exists()
    with Workspace(tmp_path / "other") as running:  # a build in progress (this process) is not touched
        result = _run("clean", str(tmp_path))
        assert "0 stale build folder(s) removed, 1 in use by a running build kept" in result.output
        assert running.root.exists()
