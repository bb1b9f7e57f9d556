"""The `edgelm` command's plumbing: the consoles, the one-line error report, how --help shows
flags, and the options that several commands share (typer reads these defaults when it builds
the commands; they are never changed)."""

from __future__ import annotations

import atexit
import functools
import os
import signal
import sys
import threading
from typing import Any, Callable

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup

from edgelm_runtime.errors import EdgelmRuntimeError


class _Flags:
    """Flags show as flags in --help: no `<bool>` beside them (typer prints one for every bool)."""

    def get_params(self, ctx: Any) -> list:
        params = super().get_params(ctx)  # type: ignore[misc]
        for param in params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
        return params


class Command(_Flags, TyperCommand):
    pass


class Group(_Flags, TyperGroup):
    pass


def _console(stderr: bool = False) -> Console:
    """Piped output is not cut to 80 columns (rich's default off a terminal): tables keep every digit."""
    stream = sys.stderr if stderr else sys.stdout
    piped = not stream.isatty() and "COLUMNS" not in os.environ
    return Console(stderr=stderr, width=1000 if piped else None)


console = _console()
err_console = _console(stderr=True)
DEBUG = {"on": False}


def reports_errors(function: Callable) -> Callable:
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if threading.current_thread() is threading.main_thread():
            # the launcher's quiet startup handlers end here: from now on Ctrl-C unwinds (cleanup runs)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        try:
            return function(*args, **kwargs)
        except EdgelmRuntimeError as exc:
            if DEBUG["on"]:
                raise
            # escaped: a message may hold brackets that rich would take for markup ('edgelm[matrix]')
            err_console.print(f"[bold red]error:[/] {escape(exc.message)}", highlight=False, soft_wrap=True)
            if exc.hint:
                err_console.print(f"[bold]hint:[/] {escape(exc.hint)}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("interrupted")
            raise typer.Exit(130) from None
    return wrapper


def run(app: Callable[[], Any]) -> None:
    """Run the typer app; a Ctrl-C that reports_errors handled always ends with exit status 130.

    CPython (3.11 here) marks a KeyboardInterrupt that passes out of exec() of a string as
    unhandled, even when an outer frame catches it, and under `python -m edgelm.cli` then kills
    the interpreter with SIGINT at exit (status -2). dataclasses, typing and numpy call exec()
    while importing, so a Ctrl-C in the first seconds of a build hit it about one time in three.
    The exit handlers run and the streams are flushed first, as a normal exit would."""
    try:
        app()
    except SystemExit as exc:
        if exc.code != 130:
            raise
        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(130)


SETTINGS = {"help_option_names": ["-h", "--help"]}  # -h is --help

PROFILE = typer.Option(None, "--profile", "-p", help="Device profile name or .yaml path (default cpu-int8).")
MODEL = typer.Option(None, "--model", "-m",
                     help="HF folder, .gguf file or org/name in the local HF cache (default: SmolLM2-135M-Instruct).")
ADAPTER = typer.Option(None, "--adapter", "-a",
                       help="PEFT LoRA folder, optionally :WEIGHT (repeatable, merged in order; replaces the recipe's list).")
RECIPE = typer.Option(None, "--recipe", "-r", help="Recipe .yaml.")
FROM_BUNDLE = typer.Option(None, "--from-bundle",
                           help="Rebuild from the plan recorded in this bundle's manifest (flags still override).")
CALIBRATION = typer.Option(None, "--calibration", help="Calibration .txt (a sample per line) or .jsonl.")
SAMPLES = typer.Option(None, "--calibration-samples", help="Number of calibration samples.")
MAX_SEQ_LEN = typer.Option(None, "--max-seq-len", help="Context length of the bundle.")
TASK = typer.Option(None, "--task", help="text-generation, or an encoder's feature-extraction, sequence-classification "
                    "or token-classification (default: read from the checkpoint).")
BUDGET = typer.Option(None, "--accuracy-budget",
                      help="Max perplexity ratio vs fp32; keeps the fewest MatMuls in fp32 that meet it.")
TEMPLATES = typer.Option(None, "--templates", help="Prompt templates .yaml (added to the defaults by name).")
PRUNE = typer.Option(None, "--prune-mlp",
                     help="Remove this fraction of every MLP's channels (structured pruning; the recipe's prune: for more).")
BUNDLE = typer.Argument(..., help="Bundle folder.")
JSON = typer.Option(False, "--json", help="Print JSON for machines.")
THREADS = typer.Option(None, "--threads", help="Intra-op threads (default: the manifest's).")
PROVIDER = typer.Option(None, "--provider",
                        help="Execution provider instead of the manifest's (e.g. CPUExecutionProvider to try a GPU bundle here).")
MAX_NEW = typer.Option(None, "--max-new-tokens", "-n")
TEMPERATURE = typer.Option(None, "--temperature", "-t", help="0 = greedy.")
TOP_K = typer.Option(None, "--top-k")
TOP_P = typer.Option(None, "--top-p")
PENALTY = typer.Option(None, "--repetition-penalty")
SEED = typer.Option(None, "--seed")
