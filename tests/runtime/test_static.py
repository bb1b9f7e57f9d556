"""The runtime's fixed-shape path (NPU bundles): chunked prefill, one-token decode and a capped KV
window must compute exactly what the dynamic graph computes, token for token."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import edgelm_runtime as er
from edgelm_runtime.errors import BundleError, GenerationError

PROMPT = "The weather today is bright and the wind is calm, so the boats went out early to fish near the rocks."


@pytest.fixture(scope="module")
def static(tiny_static_bundles) -> er.LanguageModel:
    return er.load_bundle(tiny_static_bundles["fp32"], provider="CPUExecutionProvider")


@pytest.fixture(scope="module")
def dynamic(tiny_bundle) -> er.LanguageModel:
    return er.load_bundle(tiny_bundle)


def test_chunked_prefill_gives_the_dynamic_graphs_logits(static, dynamic):
    ids = static.tokenizer.encode(PROMPT * 2)[:50]  # three full chunks of 16 and a padded one of 2
    assert len(ids) == 50 and static.manifest.static.prefill_len == 16
    np.testing.assert_allclose(static.logits(ids), dynamic.logits(ids), atol=1e-4)


def test_stepping_token_by_token_equals_one_prefill(static):
    ids = static.tokenizer.encode(PROMPT)[:20]
    stepper = static.decoder.stepper(len(ids))
    rows = [stepper.feed(np.asarray([token])).copy() for token in ids]
    np.testing.assert_allclose(np.stack(rows), static.logits(ids), atol=1e-4)


def test_greedy_tokens_and_scores_match_the_dynamic_bundle(static, dynamic):
    ids = static.tokenizer.encode(PROMPT)
    assert list(static.generate_tokens(ids, max_new_tokens=24)) == list(dynamic.generate_tokens(ids, max_new_tokens=24))
    continuations = [" calm", " stormy weather"]
    np.testing.assert_allclose(static.score(PROMPT, continuations), dynamic.score(PROMPT, continuations), atol=1e-4)


def test_the_window_is_the_context_limit(static):
    window = static.manifest.static.kv_window
    assert static.manifest.max_seq_len == window
    ids = static.tokenizer.encode(PROMPT * 20)
    with pytest.raises(GenerationError, match=f"the context is {window}"):
        list(static.generate_tokens(ids[:window + 5], max_new_tokens=4))
    tokens = list(static.generate_tokens(ids[:window - 3], max_new_tokens=50))
    assert len(tokens) <= 3 and static.last_stats.finish_reason in ("max_seq_len", "eos")


def test_quantized_npu_bundle_keeps_the_greedy_tokens(tiny_static_bundles, static):
    qdq = er.load_bundle(tiny_static_bundles["qdq"], provider="CPUExecutionProvider")
    ids = static.tokenizer.encode(PROMPT)
    assert list(qdq.generate_tokens(ids, max_new_tokens=12)) == list(static.generate_tokens(ids, max_new_tokens=12))


def test_a_manifest_that_disagrees_with_the_graphs_is_refused(tiny_static_bundles, tmp_path, edit_manifest):
    copy = shutil.copytree(tiny_static_bundles["fp32"], tmp_path / "bundle")
    edit_manifest(copy, lambda m: m["static"].update(prefill_len=8))
    with pytest.raises(BundleError, match=r"model.onnx: input input_ids has shape \[1, 16\], manifest.json static says \[1, 8\]"):
        er.load_bundle(copy, provider="CPUExecutionProvider")


def test_a_newer_runtime_field_in_static_is_refused(tiny_static_bundles, tmp_path, edit_manifest):
    copy = shutil.copytree(tiny_static_bundles["fp32"], tmp_path / "bundle")
    edit_manifest(copy, lambda m: m["static"].update(slide=True))
    with pytest.raises(BundleError, match="static.slide: unknown field"):
        er.load_bundle(copy, provider="CPUExecutionProvider")
    data = json.loads((tiny_static_bundles["fp32"] / "manifest.json").read_text())
    assert data["format_version"] == er.FORMAT_VERSION and data["static"]["decode_model_file"] == "decode.onnx"


def test_bench_runs_a_static_bundle_within_its_window(tiny_static_bundles):
    from edgelm_runtime.bench import bench

    result = bench([tiny_static_bundles["fp32"]], threads=1, repeats=1, warmup=0, decode_tokens=8,
                   provider="CPUExecutionProvider")["bundles"][0]
    assert result["decode_tokens_per_s"] > 0 and set(result["ttft_ms"]) == {"32"}  # 128 + 8 > the 128-slot window
