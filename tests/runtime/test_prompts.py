"""Prompt templates in the bundle: zero/few-shot classification by label log-likelihood, free
templates with named variables, and clear errors for missing or unknown variables."""

from __future__ import annotations

import numpy as np
import pytest

import edgelm_runtime as er
from edgelm_runtime.errors import TemplateError
from edgelm_runtime.prompts import PromptTemplate, _round_robin
from edgelm_runtime.scoring import log_softmax


def test_bundle_ships_the_default_templates(llm: er.LanguageModel) -> None:
    assert {"sentiment", "topic", "yes-no", "multiple-choice", "extract-json", "summarize", "answer"} <= set(llm.templates)
    assert llm.template("multiple-choice").chat and llm.template("multiple-choice").calibrate
    assert llm.manifest.prompt_templates_file == "templates/prompts.json"
    assert (llm.path / "templates" / "prompts.json").is_file()


def test_score_is_the_mean_log_probability_of_the_continuation_tokens(llm: er.LanguageModel) -> None:
    prompt, continuation = "the quick brown fox", " jumps over"
    context = llm.tokenizer.encode(prompt)
    whole = llm.tokenizer.encode(prompt + continuation)
    logprobs = log_softmax(llm.logits(whole))
    expected = np.mean([logprobs[i - 1, whole[i]] for i in range(len(context), len(whole))])
    assert llm.score(prompt, [continuation])[0] == pytest.approx(expected, abs=1e-4)


def test_classify_picks_the_label_with_the_highest_score(llm: er.LanguageModel) -> None:
    result = llm.classify("what a wonderful day", template="sentiment", scoring="per_token", calibrate=False)
    assert set(result.scores) == {"positive", "negative"}
    assert result.label == max(result.scores, key=result.scores.get)
    template = llm.templates["sentiment"]
    prompt = template.classify_prompt("what a wonderful day", ["positive", "negative"])
    assert list(result.scores.values()) == pytest.approx(llm.score(prompt, [" positive", " negative"]))


def test_few_shot_examples_go_before_the_query(llm: er.LanguageModel) -> None:
    template = llm.templates["sentiment"]
    prompt = template.classify_prompt("so dull", ["positive", "negative"], examples=[("loved it", "positive")])
    assert prompt.index("loved it") < prompt.index("so dull") and prompt.rstrip().endswith("Sentiment:")
    zero = llm.classify("so dull", template="sentiment")
    few = llm.classify("so dull", template="sentiment", examples=[("loved it", "positive"), ("hated it", "negative")])
    assert zero.scores != few.scores
    assert llm.classify("so dull", labels=["good", "bad", "meh"]).label in {"good", "bad", "meh"}


def test_pool_examples_are_taken_round_robin_over_labels() -> None:
    pool = [("a", "pos"), ("b", "pos"), ("c", "neg"), ("d", "neg")]
    assert _round_robin(pool, ["pos", "neg"], 3) == [("a", "pos"), ("c", "neg"), ("b", "pos")]
    assert _round_robin(pool, ["pos", "neg"], 9) == pool[:1] + pool[2:3] + pool[1:2] + pool[3:]  # the pool runs out


def test_render_and_complete_fill_named_variables(llm: er.LanguageModel) -> None:
    prompt = llm.render("answer", context="Paris is in France.", question="Where is Paris?")
    assert "Context: Paris is in France." in prompt and prompt.endswith("Answer:")
    text = llm.complete("summarize", max_new_tokens=5, text="A long text about nothing in particular.")
    assert isinstance(text, str) and "\n" not in text  # the template stops at a newline
    assert llm.last_stats.generated_tokens <= 5


@pytest.mark.parametrize(("call", "message"), [
    (lambda llm: llm.render("answer", context="x"), "variable 'question' is missing"),
    (lambda llm: llm.render("answer", context="x", question="y", tone="z"), "unknown variable 'tone'"),
    (lambda llm: llm.render("nope"), "no prompt template 'nope'"),
    (lambda llm: llm.render("sentiment", text="x"), "is a classify template"),
    (lambda llm: llm.classify("x", template="summarize"), "is a generate template"),
    (lambda llm: llm.classify("x", labels=["only"]), "two or more distinct labels"),
])
def test_template_misuse_is_a_clear_error(llm: er.LanguageModel, call, message) -> None:
    with pytest.raises((er.TemplateError, er.GenerationError), match=message):
        call(llm)


@pytest.mark.parametrize(("fields", "message"), [
    ({"kind": "classify", "query": "no placeholder"}, "needs a {text} placeholder"),
    ({"kind": "classify", "query": "{text} {other}"}, "unknown placeholder {other}"),
    ({"kind": "generate", "template": "{user.name}"}, "not a plain name"),
    ({"kind": "generate", "template": "a { b"}, "literal braces"),
    ({"kind": "classify", "query": "{text}", "labels": ("a", "b"), "examples": (("t", "c"),)}, "not one of its labels"),
])
def test_bad_templates_are_rejected_when_made(fields, message) -> None:
    with pytest.raises(er.TemplateError, match=message):
        PromptTemplate(name="t", **fields)


def test_classify_messages_put_each_example_in_its_own_turns() -> None:
    template = PromptTemplate(name="t", kind="classify", instruction="Pick: {labels}.", query="Q: {text}")
    messages = template.classify_messages("c", ["pos", "neg"], examples=[("a", "pos"), ("b", "neg")])
    assert messages == [{"role": "user", "content": "Pick: pos, neg.\n\nQ: a"}, {"role": "assistant", "content": "pos"},
                        {"role": "user", "content": "Q: b"}, {"role": "assistant", "content": "neg"},
                        {"role": "user", "content": "Q: c"}]


def test_a_template_declares_its_scoring_and_format_in_a_file_older_runtimes_still_read(tmp_path) -> None:
    from edgelm_runtime.prompts import read_prompts, template_to_dict, write_prompts

    plain = PromptTemplate(name="plain", kind="classify", query="{text}")
    assert not {"scoring", "chat", "calibrate"} & set(template_to_dict(plain))  # format 1 as before
    declared = PromptTemplate(name="mc", kind="classify", query="{text}", scoring="sum", chat=True, calibrate=True)
    write_prompts(tmp_path / "prompts.json", {"plain": plain, "mc": declared})
    assert read_prompts(tmp_path / "prompts.json") == {"plain": plain, "mc": declared}
    with pytest.raises(TemplateError, match="scoring 'mean' is not a scoring convention"):
        PromptTemplate(name="x", kind="classify", query="{text}", scoring="mean")
