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
