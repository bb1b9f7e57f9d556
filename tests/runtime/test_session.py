"""The decoder session: KV-cache steps give the same logits as re-running the whole sequence."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

import edgelm_runtime as er
from edgelm_runtime.session import open_decoder, session_options


def test_kv_cache_decode_matches_a_full_rerun(llm: er.LanguageModel) -> None:
    manifest = llm.manifest
    decoder = open_decoder(llm.path / manifest.model_file, manifest, threads=1)
    ids = llm.tokenizer.encode("Once upon a time")
    logits, past = decoder.run(np.array([ids], dtype=np.int64), None)
    for _ in range(4):
        token = int(np.argmax(logits[0, -1]))
        ids.append(token)
        logits, past = decoder.run(np.array([[token]], dtype=np.int64), past)
        assert past[0].shape == (1, manifest.kv.num_kv_heads, len(ids), manifest.kv.head_dim)
        np.testing.assert_allclose(logits[0, -1], llm.logits(ids)[-1], atol=1e-4)


def test_logits_cover_every_position(llm: er.LanguageModel) -> None:
    ids = llm.tokenizer.encode("The quick brown fox")
    logits = llm.logits(ids)
    assert logits.shape == (len(ids), llm.manifest.vocab_size)
    assert logits.dtype == np.float32


def test_batch_of_two_runs(llm: er.LanguageModel) -> None:
    manifest = llm.manifest
    decoder = open_decoder(llm.path / manifest.model_file, manifest, threads=1)
    ids = llm.tokenizer.encode("Once upon a time")
    batch, _ = decoder.run(np.array([ids, ids], dtype=np.int64), None)
    np.testing.assert_allclose(batch[1], llm.logits(ids), atol=1e-4)


def test_threads_argument_overrides_the_manifest(tiny_bundle: Path) -> None:
    manifest = dataclasses.replace(er.read_manifest(tiny_bundle), session_options={"intra_op_threads": 3})
    assert session_options(manifest).intra_op_num_threads == 3
    assert session_options(manifest, threads=1).intra_op_num_threads == 1


@pytest.mark.parametrize("options", [{"graph_optimization_level": "max"}, {"intra_threads": 2}])
def test_bad_session_options_are_bundle_errors(tiny_bundle: Path, options: dict) -> None:
    manifest = dataclasses.replace(er.read_manifest(tiny_bundle), session_options=options)
    with pytest.raises(er.BundleError, match=next(iter(options))):
        session_options(manifest)
