"""The encoder LoRA example trains on the real MiniLM, never on the texts it holds out, and writes
a PEFT adapter whose classification head is saved whole, with the held-out split beside it."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train_encoder_lora.py"



def _example():
    spec = importlib.util.spec_from_file_location("train_encoder_lora", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _heldout(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "heldout.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("task", ["sentiment", "topic"])
def test_classification_split_is_edgelm_evals_and_never_trained_on(task):
    from edgelm.eval.task_data import load_task

    labels, held_out, train = _example().classification_split(task, 50, 0)
    evaluated = load_task(task, 50, 0)
    assert [e.text for e in held_out] == [e.text for e in evaluated.examples] and labels == evaluated.labels
    seen = {e.text for e in train}
    assert not seen & {e.text for e in evaluated.examples} and not seen & {e.text for e in evaluated.pool}
    assert {e.label for e in train} == set(labels)


def test_sentiment_adapter_on_minilm(tmp_path, capsys):
    out = tmp_path / "adapter"
    assert _example().main(["--task", "sentiment", "-o", str(out), "--steps", "2", "--batch-size", "4",
                            "--samples", "20", "--calibration-samples", "5"]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "SEQ_CLS" and "classifier" in config["modules_to_save"]
    assert set(config["target_modules"]) == {"query", "value"}
    head = json.loads((out / "config.json").read_text())  # the labels edgelm build names the head's outputs by
    assert head["id2label"] == {"0": "positive", "1": "negative"} or head["id2label"] == {"0": "negative", "1": "positive"}
    from safetensors import safe_open

    with safe_open(out / "adapter_model.safetensors", "np") as weights:
        names = list(weights.keys())
    assert any(n.endswith("classifier.weight") for n in names) and any("lora_A" in n for n in names)
    held_out = _heldout(out)
    assert len(held_out) == 20 and {row["label"] for row in held_out} == {"positive", "negative"}
    _, _, train = _example().classification_split("sentiment", 20, 0)
    assert not {row["text"] for row in held_out} & {e.text for e in train}
    printed = re.search(r"held-out accuracy \(fp32 PyTorch\): ([0-9.]+)", capsys.readouterr().out)
    assert printed and 0.0 <= float(printed.group(1)) <= 1.0
    facts = json.loads((out / "training.json").read_text())
    assert facts["labels"] == ["positive", "negative"] and facts["heldout_fp32"]["accuracy"] == pytest.approx(
        float(printed.group(1)), abs=1e-4)
