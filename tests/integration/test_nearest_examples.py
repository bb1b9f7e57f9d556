"""Few-shot examples chosen per query by an encoder bundle's embeddings: the runtime's
NearestExamples, and `edgelm eval --selection nearest --embedder BUNDLE`."""

from __future__ import annotations

import numpy as np
import pytest

import edgelm_runtime as er
from edgelm.errors import ConfigError
from edgelm.eval.evaluate import evaluate
from edgelm.eval.task_data import load_task
from edgelm.eval.tasks import with_nearest_demos

POOL = [("The film was a delight from start to finish.", "positive"), ("Stocks fell sharply on Monday.", "business"),
        ("A dull, lifeless and boring movie.", "negative"), ("The striker scored twice in the final.", "sport")]


def test_select_returns_the_k_most_similar_most_similar_last(tiny_encoder_bundles):
    embedder = er.load_bundle(tiny_encoder_bundles["feature-extraction"])
    picker = er.NearestExamples(embedder, POOL)
    query = "Stocks fell sharply on Monday."  # in the pool: its own example is the most similar
    chosen = picker.select(query, 3)
    assert len(chosen) == 3 and chosen[-1] == POOL[1]
    vectors = embedder.embed([query] + [text for text, _ in POOL])
    similarity = vectors[1:] @ vectors[0] / np.linalg.norm(vectors[1:], axis=1) / np.linalg.norm(vectors[0])
    assert [POOL.index(e) for e in chosen] == list(np.argsort(-similarity)[:3][::-1])
    assert picker.select(query, 0) == [] and len(picker.select(query, 10)) == len(POOL)


def test_bad_pools_and_embedders_are_one_line_errors(tiny_encoder_bundles, tiny_bundle):
    embedder = er.load_bundle(tiny_encoder_bundles["feature-extraction"])
    with pytest.raises(er.InputError, match="the pool is empty"):
        er.NearestExamples(embedder, [])
    with pytest.raises(er.InputError, match="has no embed"):
        er.NearestExamples(object(), POOL)
    with pytest.raises(er.InputError, match="negative"):
        er.NearestExamples(embedder, POOL).select("x", -1)
    with pytest.raises(ConfigError, match="needs --embedder"):
        evaluate(tiny_bundle, tasks=("sentiment",), selection="nearest")
    with pytest.raises(ConfigError, match="needs a feature-extraction bundle, not sequence-classification"):
        evaluate(tiny_bundle, tasks=("sentiment",), selection="nearest",
                 embedder=tiny_encoder_bundles["sequence-classification"])
    with pytest.raises(ConfigError, match="unknown few-shot selection 'random'"):
        evaluate(tiny_bundle, tasks=("sentiment",), selection="random")


def test_each_example_gets_its_own_nearest_demos(tiny_encoder_bundles):
    embedder = er.load_bundle(tiny_encoder_bundles["feature-extraction"])
    task = with_nearest_demos(load_task("sentiment", 8, 0), embedder)
    picker = er.NearestExamples(embedder, [(e.text, e.label) for e in task.pool])
    for example in task.examples[:3]:
        assert [(e.text, e.label) for e in task.demos(2, example.text)] == picker.select(example.text, 2)
    first, second = task.examples[:2]
    prompt = task.prompt(first.text, task.labels, 2)[0]
    assert all(e.text in prompt for e in task.demos(2, first.text))
    assert task.prompt(second.text, task.labels, 2)[0] != prompt


def test_eval_reports_nearest_selection_under_its_own_key(tiny_bundle, tiny_encoder_bundles):
    result = evaluate(tiny_bundle, reference=str(tiny_bundle), tasks=("sentiment",), windows=2, window_len=64,
                      samples=6, shots=(0, 2), selection="nearest", embedder=tiny_encoder_bundles["feature-extraction"],
                      formats=("plain", "classify"))
    assert set(result["tasks"]) == {"sentiment-0shot", "sentiment-0shot-classify", "sentiment-2shot-nearest",
                                    "sentiment-2shot-classify-nearest"}
    nearest = result["tasks"]["sentiment-2shot-nearest"]
    assert nearest["selection"] == "nearest" and result["tasks"]["sentiment-0shot"]["selection"] is None
    assert nearest["accuracy"] == nearest["reference_accuracy"]  # the bundle against itself
