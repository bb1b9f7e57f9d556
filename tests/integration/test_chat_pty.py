"""`edgelm chat` driven through a pseudo-terminal, as a person uses it: streaming answers with
tokens/s, /system, /reset, Ctrl-C stopping an answer, and Ctrl-D / /exit leaving cleanly."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import subprocess
import sys
import termios
import time

import pytest

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pseudo-terminal")


class Terminal:
    def __init__(self, *args: str) -> None:
        self.master, slave = pty.openpty()
        env = {**os.environ, "COLUMNS": "120", "TERM": "xterm"}
        # a session of its own with the pty as controlling terminal, so Ctrl-C becomes SIGINT as in a shell
        self.process = subprocess.Popen([sys.executable, "-m", "edgelm.cli", *args], stdin=slave, stdout=slave,
                                        stderr=slave, env=env, close_fds=True, start_new_session=True,
                                        preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
        os.close(slave)
        self.output = ""

    def expect(self, text: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while text not in self.output:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.process.poll() is not None and not self._ready(0):
                raise AssertionError(f"{text!r} not seen; output so far:\n{self.output}")
            if self._ready(min(remaining, 0.5)):
                try:
                    self.output += os.read(self.master, 4096).decode("utf-8", "replace")
                except OSError:
                    pass
        return self.output

    def expect_any(self, *texts: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while not any(t in self.output for t in texts):
            if time.monotonic() > deadline:
                raise AssertionError(f"none of {texts} seen; output so far:\n{self.output}")
            if self._ready(0.2):
                try:
                    self.output += os.read(self.master, 4096).decode("utf-8", "replace")
                except OSError:
                    pass
        return next(t for t in texts if t in self.output)

    def send(self, data: str) -> None:
        os.write(self.master, data.encode())

    def _ready(self, timeout: float) -> bool:
        return bool(select.select([self.master], [], [], timeout)[0])

    def close(self) -> int:
        try:
            return self.process.wait(timeout=30)
        finally:
            os.close(self.master)


def test_chat_in_a_terminal(tiny_bundle):
    term = Terminal("chat", str(tiny_bundle), "-n", "6")
    try:
        term.expect("you>")
        term.send("hello there\r")
        term.expect("tok/s")
        term.send("/system You are a pirate.\r")
        term.expect("system prompt set")
        term.send("/reset\r")
        term.expect("history cleared")
        term.send("\x04")  # Ctrl-D at the prompt
        assert term.close() == 0
    finally:
        if term.process.poll() is None:
            term.process.kill()
    assert "Traceback" not in term.output and term.output.count("bot>") == 1


def test_ctrl_c_stops_an_answer_and_the_chat_goes_on(tiny_bundle):
    term = Terminal("chat", str(tiny_bundle), "-n", "100000")  # runs to the end of the context
    try:
        term.expect("you>")
        term.send("tell me everything\r")
        term.expect("bot>")
        # Ctrl-C (SIGINT): stops the answer, or clears the prompt if it had ended. Pressed again if
        # nothing happened in 5 s: on a cold first start the first SIGINT was seen lost once in ~10 runs.
        for _ in range(3):
            term.send("\x03")
            try:
                term.expect_any("stopped", "to quit", timeout=5)
                break
            except AssertionError:
                continue
        assert "stopped" in term.output or "to quit" in term.output, term.output
        term.send("hello again\r")
        term.expect("tok/s")
        term.send("/exit\r")
        assert term.close() == 0
    finally:
        if term.process.poll() is None:
            term.process.kill()
    assert "Traceback" not in term.output
