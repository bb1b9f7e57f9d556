"""`edgelm eval`: exact numbers for a bundle against itself, the source-model default, the JSON schema."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from edgelm.cli import app
from edgelm.eval.evaluate import evaluate
from edgelm.eval.task_data import load_task

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
                                      "--tasks", "sentiment", "--samples", "4", "--shots", "0", "--formats", "plain,chat"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout[result.stdout.index("{"):])
    for key in ("perplexity", "reference_perplexity", "perplexity_ratio", "top1_agreement", "kl_divergence", "tasks"):
        assert key in data
    assert set(data["tasks"]) == {"sentiment-0shot", "sentiment-0shot-chat"}
    assert data["tasks"]["sentiment-0shot-chat"]["format"] == "chat"
    task = data["tasks"]["sentiment-0shot"]
    assert set(task) == {"accuracy", "reference_accuracy", "n", "scoring", "format", "selection", "by_scoring"}
    conventions = ("sum", "per_token", "per_char", "per_byte")
    assert set(task["by_scoring"]) == {*conventions, *(f"{c}+calibrated" for c in conventions)}
    # "default" is what classify() applies: scoring.label_convention of the labels' token counts
    from edgelm_runtime import load_bundle
    from edgelm_runtime.scoring import label_convention

    counts = [len(load_bundle(tiny_bundle).tokenizer.encode(" " + label, add_special_tokens=False)) for label in ("positive", "negative")]
    scoring, calibrate = label_convention(counts)
    applied = scoring + ("+calibrated" if calibrate else "")
    assert task["scoring"] == "default" and task["by_scoring"][applied]["accuracy"] == task["accuracy"]
    # the bundle against its own source model in fp32: every convention agrees on which label wins
    assert all(entry["accuracy"] == entry["reference_accuracy"] for entry in task["by_scoring"].values())


def test_task_splits_are_fixed_balanced_and_disjoint():
    first, again = load_task("sentiment", 20, seed=0), load_task("sentiment", 20, seed=0)
    assert first.examples == again.examples
    assert sum(e.label == "positive" for e in first.examples) == 10
    assert not set(first.examples) & set(first.pool)
    topic = load_task("topic", 25, seed=0)
    assert set(topic.labels) == {"business", "entertainment", "politics", "sports", "tech"}
    prompt, before = topic.prompt(topic.examples[0].text, topic.labels, shots=5)
    assert before == " "
    assert prompt.count("Topic (") == 6 and all(f"): {label}\n\n" in prompt for label in topic.labels)


def _damaged_copy(bundle, dest):
    """The bundle with every weight MatMul's weights replaced by noise, manifest hashes updated."""
    import dataclasses
    import shutil

    import numpy as np
    import onnx
    from onnx import numpy_helper

    from edgelm_runtime.bundle import describe_files, read_manifest, write_manifest

    shutil.copytree(bundle, dest)
    model = onnx.load(str(dest / "model.onnx"))
    weights = {n.input[1] for n in model.graph.node if n.op_type == "MatMul"}
    rng = np.random.default_rng(0)
    for init in model.graph.initializer:
        if init.name in weights:
            array = numpy_helper.to_array(init)
            init.CopyFrom(numpy_helper.from_array(array * 3 * rng.standard_normal(array.shape).astype(array.dtype), init.name))
    (dest / "model.onnx.data").unlink()
    onnx.save_model(model, str(dest / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    write_manifest(dest, dataclasses.replace(read_manifest(dest), files=describe_files(dest)))
    return dest


def test_damaged_bundle_fails_the_gates_with_the_numbers(tiny_bundle, tmp_path):
    damaged = _damaged_copy(tiny_bundle, tmp_path / "damaged")
    args = ["eval", str(damaged), "--reference", str(tiny_bundle), "--windows", "2", "--window-len", "64",
            "--tasks", "sentiment", "--samples", "8", "--shots", "0"]
    gated = CliRunner().invoke(app, args + ["--min-top1-agreement", "0.9", "--max-kl-divergence", "0.01"])
    assert gated.exit_code == 2
    # the numbers, in one line: "error: eval: tiny-fp32: top-1 agreement 0.008 < 0.9; KL divergence 0.0256 > 0.01"
    line = next(l for l in gated.output.splitlines() if l.startswith("error:"))
    assert re.search(r"top-1 agreement 0\.\d+ < 0\.9; KL divergence [\d.]+ > 0\.01", line), line
    # the same bundle against itself passes the same gates
    same = CliRunner().invoke(app, ["eval", str(tiny_bundle), "--reference", str(tiny_bundle), "--windows", "2",
                                    "--window-len", "64", "--tasks", "", "--max-perplexity-ratio", "1.05",
                                    "--min-top1-agreement", "0.9", "--max-accuracy-drop", "0"])
    assert same.exit_code == 0, same.output


def test_bad_gate_value_is_a_one_line_error(tiny_bundle):
    result = CliRunner().invoke(app, ["eval", str(tiny_bundle), "--tasks", "", "--max-perplexity-ratio", "0.5"])
    assert result.exit_code == 2 and "max_perplexity_ratio" in result.output and "Traceback" not in result.output


def test_api_evaluate_measures_and_applies_the_gates(tiny_bundle, tmp_path):
    from edgelm import api
    from edgelm.errors import ConfigError, QualityGateError

    small = {"windows": 2, "window_len": 64, "tasks": ("sentiment",), "samples": 4, "shots": (0,)}
    same = api.evaluate(tiny_bundle, reference=str(tiny_bundle), max_perplexity_ratio=1.05, min_top1_agreement=0.9,
                        max_accuracy_drop=0, **small)
    assert same.passed and same.failures == () and same.result["top1_agreement"] == 1.0
    assert set(same.result["tasks"]) == {"sentiment-0shot"}
    damaged = _damaged_copy(tiny_bundle, tmp_path / "damaged")
    gates = {"min_top1_agreement": 0.9, "max_kl_divergence": 0.01}
    with pytest.raises(QualityGateError, match=r"top-1 agreement 0\.\d+ < 0\.9; KL divergence [\d.]+ > 0\.01"):
        api.evaluate(damaged, reference=str(tiny_bundle), **gates, **small)
    listed = api.evaluate(damaged, reference=str(tiny_bundle), check=False, **gates, **small)
    assert not listed.passed and len(listed.failures) == 2 and listed.result["top1_agreement"] < 0.9
    with pytest.raises(QualityGateError):
        listed.check()
    with pytest.raises(ConfigError, match="max_perplexity_ratio"):  # checked before anything loads
        api.evaluate(tmp_path / "no-such-bundle", max_perplexity_ratio=0.5)


def test_the_multiple_choice_and_yes_no_tasks_are_fixed_and_fair():
    capitals = load_task("capitals", 40, seed=0)
    assert capitals == load_task("capitals", 40, seed=0) and len(capitals.examples) == 40 and capitals.labels == ()
    for question in (*capitals.examples, *capitals.pool):
        assert len(set(question.options)) == 4 and question.label in question.options
    assert {q.text for q in capitals.examples}.isdisjoint(q.text for q in capitals.pool)
    assert any(" " in option for q in capitals.examples for option in q.options)  # multi-word answers
    # the gold answer sits at each of the 4 positions: no option order to exploit
    assert {q.options.index(q.label) for q in capitals.examples} == {0, 1, 2, 3}
    france = next(q for q in load_task("capitals", 400, seed=0).examples if q.text == "France")
    assert france.label == "Paris"
    yesno = load_task("yesno", 40, seed=1)
    assert sorted(e.label for e in yesno.examples) == ["no"] * 20 + ["yes"] * 20
    prompt, before = yesno.prompt(yesno.examples[0].text, yesno.labels, shots=2)
    assert prompt.count("Question: Is ") == 3 and prompt.endswith("?\nAnswer (yes or no):") and before == " "


def test_the_classify_format_measures_what_classify_decides(tiny_bundle):
    """eval's "classify" format scores exactly the prompt llm.classify(question, labels=options)
    builds, so its accuracy is the fraction of classify() calls that pick the gold option."""
    import edgelm_runtime
    from edgelm.eval.tasks import task_accuracy
    from edgelm_runtime.scoring import SCORINGS

    llm = edgelm_runtime.load_bundle(tiny_bundle)
    task = load_task("capitals", 12, seed=0)
    encode = lambda text: llm.tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    accuracy = task_accuracy(task, 0, encode, [llm.continuation_logprobs], llm.manifest.max_seq_len, "classify",
                             llm.render_chat)[0]
    for scoring in SCORINGS:
        for calibrate in (False, True):
            picks = [llm.classify(task.ask.format(text=q.text), labels=list(q.options), scoring=scoring,
                                  calibrate=calibrate).label == q.label for q in task.examples]
            key = scoring + ("+calibrated" if calibrate else "")
            assert accuracy[key] == pytest.approx(sum(picks) / len(picks)), key
    picks = [llm.classify(task.ask.format(text=q.text), labels=list(q.options)).label == q.label for q in task.examples]
    assert accuracy["default"] == pytest.approx(sum(picks) / len(picks))


@pytest.mark.parametrize(("flag", "value", "message"), [("--formats", "plain,cloze", "unknown prompt format 'cloze'"),
                                                        ("--tasks", "boolq", "unknown task 'boolq'")])
def test_an_unknown_format_or_task_is_one_clear_error(tiny_bundle, flag, value, message):
    from tests.integration.test_cli import _assert_clean_error, _run

    _assert_clean_error(_run("eval", str(tiny_bundle), "--windows", "1", "--window-len", "16", flag, value), message,
                        "use one of:")
