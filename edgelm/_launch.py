"""The `edgelm` command's entry point: a quiet exit for Ctrl-C or SIGTERM while the CLI imports.

Importing the CLI (typer, rich, pydantic) takes about half a second; a Ctrl-C in that window
would print a KeyboardInterrupt traceback from deep inside importlib. Nothing has been written
yet, so the handler just exits (130 / 143, as the CLI does later)."""

from __future__ import annotations

import os
import signal
import sys


def _quit(signum: int, frame: object) -> None:
    sys.stderr.write("interrupted\n")
    sys.stderr.flush()
    os._exit(128 + signum)


def main() -> None:
    signal.signal(signal.SIGINT, _quit)
    signal.signal(signal.SIGTERM, _quit)
    from edgelm import cli

    signal.signal(signal.SIGINT, signal.default_int_handler)  # from here the CLI reports interrupts itself
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    cli.main()
