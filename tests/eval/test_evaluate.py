"""`edgelm eval`: exact numbers for a bundle against itself, the source-model default, the JSON schema."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from edgelm.cli import app
from edgelm.eval.evaluate import evaluate
from edgelm.eval.tasks import load_task

SMALL = {"windows": 2, "window_len": 64, "samples": 8, "shots": (0, 2)}


def test_bundle_against_itself_is_exact(tiny_bundle):
    result = evaluate(tiny_bundle, reference=str(tiny_bundle), tasks=("sentiment", "topic"), **SMALL)
    assert result["perplexity_ratio"] == 1.0 and result["top1_agreement"] == 1.0 and result["kl_divergence"] == 0.0
    assert set(result["tasks"]) == {"sentiment-0shot", "sentiment-2shot", "topic-0shot", "topic-2shot"}
    for task in result["tasks"].values():
        assert task["accuracy"] == task["reference_accuracy"] and task["n"] > 0


def test_default_reference_is_the_recorded_source_model(tiny_bundle):
    result = evaluate(tiny_bundle, tasks=("sentiment",), **SMALL)
    assert "PyTorch fp32" in result["reference"]
    assert result["perplexity_ratio"] == pytest.approx(1.0, abs=1e-3) and result["top1_agreement"] > 0.99


def test_eval_json_schema(tiny_bundle):
    result = CliRunner().invoke(app, ["eval", str(tiny_bundle), "--json", "--windows", "2", "--window-len", "64",
                                      "--tasks", "sentiment", "--samples", "4", "--shots", "0"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout[result.stdout.index("{"):])
    for key in ("perplexity", "reference_perplexity", "perplexity_ratio", "top1_agreement", "kl_divergence", "tasks"):
        assert key in data
    assert set(data["tasks"]["sentiment-0shot"]) == {"accuracy", "reference_accuracy", "n"}


def test_task_splits_are_fixed_balanced_and_disjoint():
    first, again = load_task("sentiment", 20, seed=0), load_task("sentiment", 20, seed=0)
    assert first.examples == again.examples
    assert sum(e.label == "positive" for e in first.examples) == 10
    assert not set(first.examples) & set(first.pool)
    topic = load_task("topic", 25, seed=0)
    assert set(topic.labels) == {"business", "entertainment", "politics", "sports", "tech"}
    prompt = topic.prompt(topic.examples[0].text, shots=5)
    assert prompt.count("Topic (") == 6 and all(f"): {label}\n\n" in prompt for label in topic.labels)
