"""Atomic publishing: a build writes into a temporary folder beside the output and moves the
finished bundle into place in one rename. An interrupted or failed build leaves nothing behind,
and an existing bundle is replaced only with --force (and only once the new one is complete)."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from edgelm.errors import BundleExistsError, ConfigError

_PREFIX = ".edgelm-build-"
_STALE_SECONDS = 24 * 3600


class Workspace:
    def __init__(self, output: Path, force: bool = False) -> None:
        self.output = Path(output).absolute()
        self.force = force
        self.root: Path | None = None

    def check_output(self) -> None:
        """Fail fast, before any work, on an output that cannot be written."""
        out = self.output
        if out.exists() and not out.is_dir():
            raise ConfigError(f"{out}: output path is a file", hint="choose a folder path for -o")
        if out.exists() and not self.force:
            raise BundleExistsError(f"{out}: output already exists", hint="pass --force to replace it, or choose another -o")
        parent = out.parent
        if parent.exists() and not os.access(parent, os.W_OK):
            raise ConfigError(f"{parent}: folder is not writable", hint="choose an output folder you can write to")

    def __enter__(self) -> Workspace:
        self.check_output()
        self.output.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(self.output.parent)
        self.root = Path(tempfile.mkdtemp(prefix=_PREFIX, dir=self.output.parent))
        (self.root / "work").mkdir()
        (self.root / "bundle").mkdir()
        return self

    @property
    def work_dir(self) -> Path:
        return self.root / "work"

    @property
    def bundle_dir(self) -> Path:
        return self.root / "bundle"

    def publish(self) -> Path:
        """Move the finished bundle into place; the old one (with --force) goes only after."""
        self.check_output()
        old = None
        if self.output.exists():
            old = self.root / "replaced"
            os.replace(self.output, old)
        os.replace(self.bundle_dir, self.output)
        return self.output

    def __exit__(self, *exc_info: object) -> None:
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)


def _remove_stale(folder: Path) -> None:
    """Remove temporary folders that a killed build (SIGKILL, power loss) left behind."""
    for path in folder.glob(_PREFIX + "*"):
        try:
            if time.time() - path.stat().st_mtime > _STALE_SECONDS:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            continue
