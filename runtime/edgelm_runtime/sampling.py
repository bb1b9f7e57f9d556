"""Choose the next token from the last position's logits: greedy, or seeded random sampling.

Same order as Hugging Face's logits processors (repetition penalty, temperature, top-k, top-p),
so a bundle samples like the model it came from. numpy only; one vector per step."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edgelm_runtime.errors import GenerationError


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 = greedy (argmax). top_k 0 and top_p 1.0 switch those filters off.
    presence_penalty / frequency_penalty are OpenAI's: subtracted from the logit of each token
    already generated, once / once per time it was generated (0 = off, range [-2, 2])."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # speculative greedy decoding from prompt-lookup drafts of up to this many tokens (0 = off):
    # plain greedy's output in fewer runs (generate.decode_tokens says where exactly). Ignored when
    # sampling, with a penalty, a grammar or logprobs, and in a batch (edgelm serve --parallel > 1).
    prompt_lookup: int = 0

    def __post_init__(self) -> None:
        _check(self.temperature, "temperature", ">= 0 (0 = greedy)", lambda v: v >= 0)
        _check(self.top_k, "top_k", "a whole number >= 0 (0 = off)", lambda v: _is_whole(v) and v >= 0)
        _check(self.top_p, "top_p", "in (0, 1] (1 = off)", lambda v: 0 < v <= 1)
        _check(self.repetition_penalty, "repetition_penalty", "> 0 (1 = off)", lambda v: v > 0)
        for name in ("presence_penalty", "frequency_penalty"):
            _check(getattr(self, name), name, "in [-2, 2] (0 = off)", lambda v: -2 <= v <= 2)
        _check(self.prompt_lookup, "prompt_lookup", "a whole number in [0, 64] (0 = off)",
               lambda v: _is_whole(v) and 0 <= v <= 64)
        if self.seed is not None:
            _check(self.seed, "seed", "a whole number >= 0 or None", lambda v: _is_whole(v) and v >= 0)


def _is_whole(value: object) -> bool:
    return isinstance(value, numbers.Integral)


def _check(value: object, name: str, allowed: str, ok: Callable[[float], bool]) -> None:
    valid = (isinstance(value, numbers.Real) and not isinstance(value, bool)
             and math.isfinite(value) and ok(value))
    if not valid:
        raise GenerationError(f"{name} is {value!r}; it must be {allowed}", hint=f"pass a {name} {allowed}")


class Sampler:
    """Picks token ids; holds the seeded random generator so a seed gives the same text every run."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self._rng = np.random.default_rng(params.seed)

    @property
    def counts_tokens(self) -> bool:
        """Whether sample() needs the generated tokens' counts (the OpenAI penalties are on)."""
        return self.params.presence_penalty != 0 or self.params.frequency_penalty != 0

    def sample(self, logits: np.ndarray, seen: np.ndarray | None = None, counts: np.ndarray | None = None) -> int:
        """The next token for one logits vector (V,). `seen`: ids (or a boolean mask over the
        vocabulary) of tokens already in the sequence, for the repetition penalty; `counts`: how
        often each token was generated so far, for the presence and frequency penalties."""
        p = self.params
        if p.temperature == 0 and p.repetition_penalty == 1.0 and not self.counts_tokens:
            return int(np.argmax(logits))  # the default: no copy needed
        scores = np.array(logits, dtype=np.float64)  # a private copy: the filters below edit it in place
        if p.repetition_penalty != 1.0 and seen is not None:
            picked = scores[seen]  # CTRL: shrink positive logits, push negative ones further down
            scores[seen] = np.where(picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty)
        if counts is not None and self.counts_tokens:
            scores -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
        if p.temperature == 0:
            return int(np.argmax(scores))
        scores /= p.temperature
        if 0 < p.top_k < scores.size:
            kth_best = np.partition(scores, -p.top_k)[-p.top_k]
            scores[scores < kth_best] = -np.inf
        probs = np.exp(scores - scores.max())
        probs /= probs.sum()
        if p.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            before = np.cumsum(probs[order]) - probs[order]  # mass of the better tokens
            probs[order[before >= p.top_p]] = 0.0  # keep the smallest set reaching top_p (at least one)
        cdf = np.cumsum(probs)
        index = np.searchsorted(cdf, self._rng.random() * cdf[-1], side="right")
        return int(min(index, scores.size - 1))
