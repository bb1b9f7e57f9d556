"""Continuation scoring on the KV cache equals scoring the whole sequence in one pass."""

from __future__ import annotations

import numpy as np
import pytest

from edgelm_runtime import GenerationError


def _full_pass(llm, prompt, tokens):
    logits = llm.logits(prompt + tokens).astype(np.float64)
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return np.array([logp[len(prompt) - 1 + i, t] for i, t in enumerate(tokens)])


def test_continuation_logprobs_match_a_full_pass(llm):
    prompt = llm.tokenizer.encode("Review: a fine film\nSentiment:", add_special_tokens=False)
    continuations = [llm.tokenizer.encode(" positive", add_special_tokens=False), [5], [7, 9, 11]]
    scores = llm.continuation_logprobs(prompt, continuations)
    for tokens, got in zip(continuations, scores):
        np.testing.assert_allclose(got, _full_pass(llm, prompt, tokens), atol=1e-4)


def test_empty_continuation_is_rejected(llm):
    with pytest.raises(GenerationError, match="at least one token"):
        llm.continuation_logprobs([1, 2], [[3], []])


def _label_logprobs(llm, prompt, labels):
    """Each label's per-token log-probabilities after `prompt`, by hand from full passes."""
    context = llm.tokenizer.encode(prompt)
    out = []
    for label in labels:
        whole = llm.tokenizer.encode(prompt + label)
        assert whole[:len(context)] == context
        out.append(_full_pass(llm, context, whole[len(context):]))
    return out


def test_each_scoring_convention_against_a_hand_computation(llm):
    prompt, labels = "Review: a fine film\nSentiment:", [" positive", " negative", " né"]
    by_hand = _label_logprobs(llm, prompt, labels)
    expected = {"sum": [lp.sum() for lp in by_hand], "per_token": [lp.mean() for lp in by_hand],
                "per_char": [lp.sum() / len(text) for lp, text in zip(by_hand, labels)],
                "per_byte": [lp.sum() / len(text.encode()) for lp, text in zip(by_hand, labels)]}
    for scoring, want in expected.items():
        np.testing.assert_allclose(llm.score(prompt, labels, scoring=scoring), want, atol=1e-4, err_msg=scoring)
    assert llm.score(prompt, labels) == llm.score(prompt, labels, scoring="per_token")  # the default
    assert expected["per_byte"][2] != pytest.approx(expected["per_char"][2])  # "é" is two bytes


def test_contextual_calibration_subtracts_the_content_free_prior(llm):
    labels = ["positive", "negative"]
    raw = llm.classify("a fine film", labels=labels, scoring="sum")
    calibrated = llm.classify("a fine film", labels=labels, scoring="sum", calibrate=True)
    prior = llm.classify("N/A", labels=labels, scoring="sum")  # the content-free input, same prompt
    for label in labels:
        assert calibrated.scores[label] == pytest.approx(raw.scores[label] - prior.scores[label], abs=1e-9)
    assert calibrated.label == max(labels, key=calibrated.scores.__getitem__)
    # calibrated, the content-free input itself scores 0 for every label: no label is preferred a priori
    assert all(v == pytest.approx(0.0, abs=1e-9) for v in llm.classify("N/A", labels=labels, calibrate=True).scores.values())


def test_the_default_convention_follows_the_labels_token_counts(llm):
    """classify() without a scoring: one-token labels per_token uncalibrated; once any label spans
    several tokens, sum calibrated (docs/zero-shot.md measured both)."""
    from edgelm_runtime.scoring import label_convention

    assert label_convention([1, 1, 1]) == ("per_token", False) and label_convention([1, 3]) == ("sum", True)
    words = [w for w in ("the", "a", "is", "and", "to", "of", "in") if len(llm.tokenizer.encode(" " + w)) == 1]
    one, several = words[:2], [words[0], "quite negative indeed"]
    single = llm.classify("a fine film", labels=one)
    assert (single.scoring, single.calibrated) == ("per_token", False)
    # a repeated prompt reuses its cached prefix (kv_reuse): the same scores up to float rounding
    assert single.scores == pytest.approx(llm.classify("a fine film", labels=one, scoring="per_token",
                                                       calibrate=False).scores, abs=1e-6)
    multi = llm.classify("a fine film", labels=several)
    assert (multi.scoring, multi.calibrated) == ("sum", True)
    assert multi.scores == pytest.approx(llm.classify("a fine film", labels=several, scoring="sum",
                                                      calibrate=True).scores, abs=1e-6)
    # the caller's choice wins over the rule, each part on its own
    assert llm.classify("a fine film", labels=several, calibrate=False).calibrated is False
    assert llm.classify("a fine film", labels=several, scoring="per_char").scoring == "per_char"


def test_an_unknown_scoring_convention_is_refused(llm):
    with pytest.raises(GenerationError, match="scoring 'mean' is not a scoring convention"):
        llm.score("a", [" b"], scoring="mean")
    with pytest.raises(GenerationError, match="use one of: sum, per_token, per_char, per_byte"):
        llm.classify("a", labels=["x", "y"], scoring="acc_norm")


def _word_encoder():
    """A toy tokenizer: each whitespace-led word is one token, and a lone space is its own token."""
    import re

    vocab: dict[str, int] = {}
    return lambda text: [vocab.setdefault(piece, len(vocab)) for piece in re.findall(r"\s?\S+|\s+", text)]


def test_the_prompt_continuation_boundary_is_split_as_lm_eval_splits_it():
    from edgelm_runtime.scoring import split_continuations

    encode = _word_encoder()
    # whitespace ending the prompt moves onto the continuation: " yes" stays one token, as in "Q: yes"
    context, tails = split_continuations(encode, "Q: ", ["yes", "no"])
    assert context == encode("Q:") and tails == [encode("Q: yes")[1:], encode("Q: no")[1:]]
    assert len(tails[0]) == 1
    # a continuation that merges with the prompt's last token: scored from its own tokens
    context, tails = split_continuations(encode, "Q:", ["x"])
    assert context == encode("Q:") and tails == [encode("x")]
    with pytest.raises(GenerationError, match="no continuations"):
        split_continuations(encode, "Q:", [])


def test_a_chat_classify_template_scores_each_label_as_the_reply(llm, monkeypatch):
    from edgelm_runtime import prompt_tasks as model, prompts
    from edgelm_runtime.scoring import split_continuations

    chat = {"kind": "classify", "instruction": "Answer with one of: {labels}.", "query": "{text}", "chat": True,
            "scoring": "sum", "calibrate": False}
    monkeypatch.setattr(model, "DEFAULT_CLASSIFY", chat)
    labels = ["positive", "negative"]
    got = llm.classify("a fine film", labels=labels)
    messages = prompts.template_from_dict("classify", chat).classify_messages("a fine film", labels)
    assert messages == [{"role": "user", "content": "Answer with one of: positive, negative.\n\na fine film"}]
    prompt = llm.render_chat(messages)
    context, tails = split_continuations(lambda t: llm.tokenizer.encode(t, add_special_tokens=False), prompt, labels)
    by_hand = [float(lp.sum()) for lp in llm.continuation_logprobs(context, tails)]  # the template's scoring: sum
    assert [got.scores[label] for label in labels] == pytest.approx(by_hand, abs=1e-6)
    assert llm.classify("a fine film", labels=labels, scoring="per_token").scores != got.scores  # the caller's wins


def test_a_template_that_declares_calibration_calibrates_unless_the_caller_says_no(llm, monkeypatch):
    from edgelm_runtime import prompt_tasks as model

    labels = ["positive", "negative"]
    raw, calibrated = (llm.classify("a fine film", labels=labels, calibrate=c).scores for c in (False, True))
    monkeypatch.setattr(model, "DEFAULT_CLASSIFY", {**model.DEFAULT_CLASSIFY, "calibrate": True})
    assert llm.classify("a fine film", labels=labels).scores == pytest.approx(calibrated, abs=1e-6)
    assert calibrated != pytest.approx(raw, abs=1e-3)
    assert llm.classify("a fine film", labels=labels, calibrate=False).scores == pytest.approx(raw, abs=1e-6)
