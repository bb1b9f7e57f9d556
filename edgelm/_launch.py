"""The `edgelm` command's entry point: a quiet exit for Ctrl-C or SIGTERM until a command runs.

Importing the CLI (typer, rich, pydantic) and typer building its commands take about half a
second; a Ctrl-C in that window would print a KeyboardInterrupt traceback from importlib or
typer. Nothing has been written yet, so the handler just exits (130 / 143, as the CLI does later)."""

from __future__ import annotations

import os
import signal


def _quit(signum: int, frame: object) -> None:
    os.write(2, b"interrupted\n")  # not sys.stderr: the signal may land while its buffer is locked
    os._exit(128 + signum)


def main() -> None:
    signal.signal(signal.SIGINT, _quit)
    signal.signal(signal.SIGTERM, _quit)
    from edgelm import cli

    cli.main()  # each command restores the default handlers as it starts (cli.reports_errors)
