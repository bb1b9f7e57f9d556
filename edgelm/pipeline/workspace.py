"""Atomic publishing: a build writes into a temporary folder beside the output and moves the
finished bundle into place in one rename. An interrupted or failed build leaves nothing behind,
and an existing bundle is replaced only with --force (and only once the new one is complete).

A build killed outright (SIGKILL, the OOM killer, power loss) cannot clean up: its folder
(`.edgelm-build-*`, often hundreds of MB) stays. Each workspace records its owner in `owner.json`
(pid, the process's start time, host), so the next build beside the same output, or `edgelm clean`
(`clean_stale`), removes the folders whose owner process is gone, at once, and leaves a build that
is still running alone. A folder from another host (a shared disk) or without an owner record (an
older edgelm) is removed only once it is a day old."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import tempfile
import time
from pathlib import Path
from typing import Any

from edgelm.errors import BundleExistsError, ConfigError

_PREFIX = ".edgelm-build-"
_OWNER_FILE = "owner.json"
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
        clean_stale(self.output.parent)
        self.root = Path(tempfile.mkdtemp(prefix=_PREFIX, dir=self.output.parent))
        (self.root / _OWNER_FILE).write_text(json.dumps(_me()), encoding="utf-8")
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
        normalize_modes(self.bundle_dir)
        old = None
        if self.output.exists():
            old = self.root / "replaced"
            os.replace(self.output, old)
        os.replace(self.bundle_dir, self.output)
        return self.output

    def __exit__(self, *exc_info: object) -> None:
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)


def clean_stale(folder: Path) -> list[Path]:
    """Remove the build workspaces (`.edgelm-build-*`) in `folder` that no running build owns: its
    owner process on this host is gone, or (another host's, or one without an owner record) it is
    over a day old. Returns the folders removed; a missing folder has none."""
    removed = []
    for path in sorted(Path(folder).glob(_PREFIX + "*")):
        try:
            stale = path.is_dir() and not path.is_symlink() and _is_stale(path)
        except OSError:
            continue
        if stale:
            shutil.rmtree(path, ignore_errors=True)
            if not path.exists():
                removed.append(path)
    return removed


def live_workspaces(folder: Path) -> list[Path]:
    """The build workspaces in `folder` that clean_stale keeps (a build may still be using them)."""
    kept = []
    for path in sorted(Path(folder).glob(_PREFIX + "*")):
        try:
            if path.is_dir() and not path.is_symlink() and not _is_stale(path):
                kept.append(path)
        except OSError:  # removed meanwhile
            continue
    return kept


def normalize_modes(folder: Path) -> None:
    """Give every file of the bundle the mode a new file gets here (0644 under the usual umask 022):
    some writers create theirs 0600 (onnx's external data, transformers' safetensors)."""
    mode = 0o666 & ~_umask()
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink() and stat.S_IMODE(path.stat().st_mode) != mode:
            os.chmod(path, mode)


def _is_stale(path: Path) -> bool:
    age = time.time() - path.stat().st_mtime
    try:
        owner = json.loads((path / _OWNER_FILE).read_text(encoding="utf-8"))
        pid, host, started = int(owner["pid"]), str(owner["host"]), owner.get("started")
    except (OSError, ValueError, KeyError, TypeError):  # no record (an older edgelm, or killed before it was written)
        return age > _STALE_SECONDS
    if host != socket.gethostname():
        return age > _STALE_SECONDS
    return not _alive(pid, started)


def _me() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": _start_time(os.getpid()),
            "created": time.time()}


def _alive(pid: int, started: Any) -> bool:
    """Process `pid` runs, and is the one that wrote the record (not a later process given the same pid)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user
        pass
    except OSError:
        return False
    now = _start_time(pid)
    return started is None or now is None or now == started


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux /proc), None where unknown."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
        return int(text[text.rindex(")") + 2:].split()[19])  # field 22; the name (field 2) may hold spaces
    except (OSError, ValueError, IndexError):
        return None


def _umask() -> int:
    try:  # Linux 4.7+: read without changing it (os.umask sets it, racing other threads)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
