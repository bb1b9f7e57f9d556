"""Runtime-local helpers: a loaded tiny bundle, writable copies of it, and a pure byte tokenizer.

The session fixtures `tiny_bundle` and `tiny_model_dir` come from tests/conftest.py."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

import edgelm_runtime as er
from edgelm_runtime.bundle import MANIFEST_FILE, describe_files
from edgelm_runtime.tokenizer import BundleTokenizer


@pytest.fixture(scope="module")
def llm(tiny_bundle: Path) -> er.LanguageModel:
    return er.load_bundle(tiny_bundle, threads=1)


@pytest.fixture(scope="module")
def cold(tiny_bundle: Path) -> er.LanguageModel:
    """The tiny bundle without a prefix cache: every prompt prefills from scratch."""
    return er.load_bundle(tiny_bundle, kv_cache_mb=0)


@pytest.fixture
def fresh(tiny_bundle: Path) -> er.LanguageModel:
    """The tiny bundle with an empty prefix cache of its own."""
    return er.load_bundle(tiny_bundle)


@pytest.fixture
def bundle_copy(tiny_bundle: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny bundle that a test may damage."""
    return Path(shutil.copytree(tiny_bundle, tmp_path / "bundle"))


@pytest.fixture(scope="session")
def edit_manifest() -> Callable[..., None]:
    """edit_manifest(folder, edit, relist_files=False): change a copy's manifest.json in place."""
    return _edit_manifest


def _edit_manifest(folder: Path, edit: Callable[[dict], None], relist_files: bool = False) -> None:
    """relist_files recomputes `files` after files were added or changed."""
    path = folder / MANIFEST_FILE
    data = json.loads(path.read_text(encoding="utf-8"))
    edit(data)
    if relist_files:
        data["files"] = {rel: {"sha256": e.sha256, "size": e.size} for rel, e in describe_files(folder).items()}
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")


@pytest.fixture(scope="session")
def byte_tokenizer() -> BundleTokenizer:
    """One token per byte and no merges: every non-ASCII character spans 2-4 tokens."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return BundleTokenizer(tokenizer)
