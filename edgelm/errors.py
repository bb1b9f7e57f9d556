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


_DISK_FULL = {28, 122, 27}        # ENOSPC, EDQUOT, EFBIG (a file size limit)
_NOT_WRITABLE = {1, 13, 30}       # EPERM, EACCES, EROFS


def write_error(exc: BaseException, where: str) -> EdgelmError | None:
    """A disk-full or permission OSError (`exc` or what it wraps) as one line naming the file;
    None for anything else."""
    seen = 0
    while exc is not None and not isinstance(exc, OSError) and seen < 8:  # libraries wrap it (torch.onnx)
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    if not isinstance(exc, OSError):
        return None
    target = exc.filename or "the bundle"
    if exc.errno in _DISK_FULL:
        return EdgelmError(f"{where}: disk full while writing {target} ({exc.strerror})",
                           hint="free space where the bundle is written (the build works in a temporary folder "
                                "beside -o and needs a few times the fp32 model's size), then rerun")
    if exc.errno in _NOT_WRITABLE:
        return EdgelmError(f"{where}: folder is not writable: cannot write {target} ({exc.strerror})",
                           hint="choose an output folder you can write to (-o)")
    return None
