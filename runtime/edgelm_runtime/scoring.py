"""Score continuations of a prompt by log-likelihood: the basis of zero/few-shot classification.

The prompt runs once; each continuation then runs on the prompt's KV cache (ORT never writes to
its inputs, so one past serves every continuation). No text is generated or parsed."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edgelm_runtime.session import DecoderSession


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log_softmax over the last axis, in float64."""
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def continuation_logprobs(decoder: DecoderSession, prompt_ids: Sequence[int],
                          continuations: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """For each continuation, the log-probability of each of its tokens after the prompt."""
    logits, past = decoder.run(np.asarray([prompt_ids], dtype=np.int64), None, last_only=True)
    first = log_softmax(logits[0, -1])
    scores = []
    for tokens in continuations:
        tokens = [int(t) for t in tokens]
        logprobs = [first[tokens[0]]]
        if len(tokens) > 1:
            step_logits, _ = decoder.run(np.asarray([tokens[:-1]], dtype=np.int64), past)
            rest = log_softmax(step_logits[0])
            logprobs += [rest[i, t] for i, t in enumerate(tokens[1:])]
        scores.append(np.asarray(logprobs))
    return scores
