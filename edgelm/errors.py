"""Errors the compiler raises. Each carries a one-line message (what, where) and a hint (the fix).

The CLI renders them once as `error: ...` / `hint: ...` with exit code 2; `--debug` shows the
traceback. The runtime's errors (BundleError, ...) share the same message + hint shape."""

from __future__ import annotations

from edgelm_runtime.errors import EdgelmRuntimeError


class EdgelmError(EdgelmRuntimeError):
    """Base class of every error edgelm reports to the user."""


class ConfigError(EdgelmError):
    """A profile, recipe or command-line option is invalid."""


class ModelLoadError(EdgelmError):
    """The model or tokenizer cannot be loaded (missing, pickle-only, unsupported architecture)."""


class AdapterError(EdgelmError):
    """A LoRA adapter cannot be merged (missing, pickle, another base, unsupported variant)."""


class StageError(EdgelmError):
    """A build stage failed or did not have its effect (parity, fusion, calibration)."""

    def __init__(self, stage: str, message: str, hint: str | None = None) -> None:
        super().__init__(f"{stage}: {message}", hint)
        self.stage = stage


class QualityGateError(StageError):
    """The built bundle misses a quality gate; no bundle is written."""


class BundleExistsError(EdgelmError):
    """The output folder exists and --force was not given."""
