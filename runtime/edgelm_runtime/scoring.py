"""Score continuations of a prompt by log-likelihood: the basis of zero/few-shot classification.

The prompt runs once; each continuation then runs on the prompt's KV cache (ORT never writes to
its inputs, so one past serves every continuation; with a prefix cache, each is rewound). No text is generated or parsed."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from edgelm_runtime.errors import GenerationError
from edgelm_runtime.kv_reuse import PrefixCache
from edgelm_runtime.session import DecoderSession

# How the log-probabilities of a continuation's tokens become its score (lm-eval's names in brackets):
# "sum" the total log-likelihood [acc]; "per_token" its mean over the tokens; "per_char" divided
# by the continuation's characters [acc_norm]; "per_byte" by its UTF-8 bytes. The continuation is
# the text as scored, its leading space included (" positive"), as lm-eval counts it.
SCORINGS = ("sum", "per_token", "per_char", "per_byte")
DEFAULT_SCORING = "per_token"  # score() without a scoring (docs/zero-shot.md measures each)


def label_convention(token_counts: Sequence[int]) -> tuple[str, bool]:
    """classify()'s default (scoring, calibrate) for labels of these token counts, chosen by the
    suite in docs/zero-shot.md. One token each: the labels compete in one next-token distribution,
    so "per_token" (equal to "sum" there) uncalibrated; calibration cost topic 29 points. A label of
    several tokens: "sum" with contextual calibration, so neither a label's length nor its prior
    as a string ("Lima" against "Caracas") decides; it won every multiple-choice row."""
    return ("sum", True) if max(token_counts) > 1 else ("per_token", False)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log_softmax over the last axis, in float64."""
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def continuation_logprobs(decoder: DecoderSession, prompt_ids: Sequence[int],
                          continuations: Sequence[Sequence[int]], cache: PrefixCache | None = None) -> list[np.ndarray]:
    """For each continuation, the log-probability of each of its tokens after the prompt. With a
    `cache`, the prompt starts from the cached run that shares its longest prefix (a few-shot
    prompt's instruction and examples), and each continuation runs on it and is rewound."""
    if cache is not None:
        return _reusing(cache, list(prompt_ids), continuations, decoder.bound_inputs)
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


def _reusing(cache: PrefixCache, prompt_ids: list[int], continuations: Sequence[Sequence[int]],
             inputs: Any) -> list[np.ndarray]:
    longest = max(len(tokens) for tokens in continuations)
    stepper = cache.take(prompt_ids, len(prompt_ids) + longest, inputs)
    try:
        first = log_softmax(stepper.feed(np.asarray(prompt_ids[stepper.length:], dtype=np.int64)))
        scores = []
        for tokens in continuations:
            tokens = [int(t) for t in tokens]
            logprobs = [first[tokens[0]]]
            if len(tokens) > 1:
                rest = log_softmax(stepper.verify(np.asarray(tokens[:-1], dtype=np.int64)))
                stepper.rewind(len(prompt_ids))
                logprobs += [rest[i, t] for i, t in enumerate(tokens[1:])]
            scores.append(np.asarray(logprobs))
        return scores
    finally:
        cache.put(stepper)


def split_continuations(encode: Callable[[str], list[int]], prompt: str,
                        continuations: Sequence[str]) -> tuple[list[int], list[list[int]]]:
    """The prompt's token ids and each continuation's, split at the boundary as lm-eval splits
    them: whitespace ending the prompt moves to the front of the continuation, and a
    continuation's tokens are those of prompt + continuation past the prompt's own (so a merge
    across the boundary is scored as the model sees it; where the prompt's tokens change, the
    continuation is encoded alone)."""
    if not continuations:
        raise GenerationError("no continuations to score", hint='pass e.g. [" yes", " no"]')
    trailing = len(prompt) - len(prompt.rstrip())
    if trailing:
        prompt, continuations = prompt[:-trailing], [prompt[-trailing:] + text for text in continuations]
    context = encode(prompt)
    tails = []
    for text in continuations:
        whole = encode(prompt + text)
        tail = whole[len(context):] if whole[:len(context)] == context else encode(text)
        if not tail:
            raise GenerationError(f"continuation {text!r} has no tokens", hint="pass non-empty continuations")
        tails.append(tail)
    return context, tails


def check_scoring(scoring: object) -> str:
    if scoring not in SCORINGS:
        raise GenerationError(f"scoring {scoring!r} is not a scoring convention", hint=f"use one of: {', '.join(SCORINGS)}")
    return str(scoring)


def aggregate(logprobs: Sequence[float], text: str, scoring: str) -> float:
    """One continuation's score under `scoring` (SCORINGS) from its tokens' log-probabilities."""
    check_scoring(scoring)
    total = float(np.sum(logprobs))
    if scoring == "sum":
        return total
    if scoring == "per_token":
        return total / max(1, len(logprobs))
    if scoring == "per_char":
        return total / max(1, len(text))
    return total / max(1, len(text.encode("utf-8")))  # per_byte
