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


def test_an_unknown_scoring_convention_is_refused(llm):
    with pytest.raises(GenerationError, match="scoring 'mean' is not a scoring convention"):
        llm.score("a", [" b"], scoring="mean")
    with pytest.raises(GenerationError, match="use one of: sum, per_token, per_char, per_byte"):
        llm.classify("a", labels=["x", "y"], scoring="acc_norm")
