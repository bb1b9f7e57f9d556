"""End to end on the real SmolLM2-135M-Instruct: the README's short form, `edgelm build --profile
cpu-int8 --prune-mlp 0.1`, passes the profile's default gates, records what pruning cost and
still answers."""

from __future__ import annotations

import json
import subprocess

import pytest

pytestmark = pytest.mark.slow


def test_pruned_build_is_smaller_and_still_answers(tmp_path):
    import edgelm_runtime as er

    out = tmp_path / "smollm2-p10"
    result = subprocess.run(["edgelm", "build", "--profile", "cpu-int8", "--prune-mlp", "0.1", "-o", str(out)],
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "vs the unpruned fp32 model" in result.stdout
    pruning = json.loads((out / "manifest.json").read_text())["pruning"]
    assert pruning["kind"] == "structured" and pruning["mlp_channels"] == [1376] * 30  # 1536 - 10 %, a multiple of 32
    assert pruning["params_before"] == 134_515_008 and pruning["params_after"] < 0.95 * pruning["params_before"]
    assert pruning["bundle_mb"] < 262  # unpruned cpu-int8: 269.0 MB
    # measured 1.30: SmolLM2-135M has little to spare, but 10 % must not wreck it
    assert 1.0 < pruning["bundle_perplexity_ratio_vs_unpruned"] < 1.5
    llm = er.load_bundle(out)
    answer = llm.chat([{"role": "user", "content": "What is the capital of France? Answer in one word."}], max_new_tokens=16)
    assert "Paris" in answer
