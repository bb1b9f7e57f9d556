"""The generation loop: one prefill run for the prompt, then one run per token on the KV cache.

Also the two pieces that turn tokens into safe text: StopFilter cuts the output before the first
stop string and, while streaming, holds back any tail that may still grow into one; and
GenerationStats, the timings of the last generation (model runs and sampling only, not the
caller's time between tokens)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from time import perf_counter
from typing import Literal

import numpy as np

from edgelm_runtime.constrained import TokenConstraint
from edgelm_runtime.errors import GenerationError
from edgelm_runtime.sampling import Sampler
from edgelm_runtime.session import DecoderSession

FinishReason = Literal["eos", "max_new_tokens", "max_seq_len", "stopped"]
MAX_STOP_STRINGS = 16   # OpenAI allows 4; every stop string costs a search per token
MAX_STOP_CHARS = 256    # per stop string


@dataclass(frozen=True)
class GenerationStats:
    """generated_tokens excludes the eos token. finish_reason "stopped": a stop string matched or
    the caller stopped reading. decode_seconds covers the runs after the first token, each with
    its sampling; prefill_seconds is the prompt's run alone."""

    prompt_tokens: int
    generated_tokens: int
    prefill_seconds: float
    decode_seconds: float
    decode_tokens_per_s: float
    time_to_first_token_s: float
    finish_reason: FinishReason
    sampling_seconds: float = 0.0  # inside decode_seconds and time_to_first_token_s


def decode_tokens(decoder: DecoderSession, prompt_ids: Sequence[int], max_new_tokens: int, sampler: Sampler,
                  eos_token_ids: Sequence[int], max_seq_len: int,
                  report: Callable[[GenerationStats], None] | None = None,
                  constraint: TokenConstraint | None = None,
                  observe: Callable[[np.ndarray, int], None] | None = None) -> Iterator[int]:
    """Yield new token ids (eos excluded) until eos, max_new_tokens or the context is full.

    The sequence never exceeds max_seq_len tokens; `report` gets the stats when the loop ends,
    also when the caller closes the iterator early. `constraint` masks the logits before each
    sample and ends the loop (as eos) once its grammar is complete; `observe(logits, token)` sees
    each step's logits (as sampled from, the mask applied) and its token, eos included."""
    eos = frozenset(eos_token_ids)
    start = perf_counter()
    stepper = decoder.stepper(capacity=min(max_seq_len, len(prompt_ids) + max_new_tokens))
    logits = stepper.feed(np.asarray(prompt_ids, dtype=np.int64))
    prefill_s = perf_counter() - start
    seen = np.zeros(logits.shape[-1], dtype=bool)  # tokens in the sequence, for the repetition penalty
    seen[np.asarray(prompt_ids)] = True
    counts = np.zeros(logits.shape[-1], dtype=np.float64) if sampler.counts_tokens else None

    def pick(logits: np.ndarray) -> int:
        if constraint is not None:
            logits = constraint.apply(logits)
        token = sampler.sample(logits, seen, counts)
        if counts is not None:
            counts[token] += 1
        if constraint is not None:
            constraint.advance(token)
        if observe is not None:
            observe(logits, token)
        return token

    token = pick(logits)
    first_token_s = perf_counter() - start
    sampling_s = first_token_s - prefill_s
    produced, decode_runs, decode_s, reason = 0, 0, 0.0, "stopped"
    step_ids = np.zeros(1, dtype=np.int64)
    try:
        while True:
            if token in eos:
                reason = "eos"
                break
            produced += 1
            seen[token] = True
            yield token
            if produced >= max_new_tokens:
                reason = "max_new_tokens"
                break
            if len(prompt_ids) + produced >= max_seq_len:
                reason = "max_seq_len"
                break
            if constraint is not None and constraint.finished:
                reason = "eos"  # the grammar is complete: nothing more may follow
                break
            step = perf_counter()
            step_ids[0] = token
            logits = stepper.feed(step_ids)
            sampled = perf_counter()
            token = pick(logits)
            done = perf_counter()
            decode_s += done - step
            sampling_s += done - sampled
            decode_runs += 1
    finally:
        if report is not None:
            report(GenerationStats(
                prompt_tokens=len(prompt_ids), generated_tokens=produced, prefill_seconds=prefill_s,
                decode_seconds=decode_s, decode_tokens_per_s=decode_runs / decode_s if decode_s > 0 else 0.0,
                time_to_first_token_s=first_token_s, finish_reason=reason, sampling_seconds=sampling_s))


class StopFilter:
    """Passes text through until a stop string appears; never lets part of a stop string out.

    At most MAX_STOP_STRINGS strings of at most MAX_STOP_CHARS characters each (10,000 stop strings
    made each token cost milliseconds). Each push searches only where a new match can be: the held
    tail never contains a whole stop string."""

    def __init__(self, stop: Sequence[str] | None) -> None:
        stop = list(stop or [])
        if len(stop) > MAX_STOP_STRINGS:
            raise GenerationError(f"stop has {len(stop)} strings; at most {MAX_STOP_STRINGS} are allowed",
                                  hint="pass fewer stop strings")
        for index, text in enumerate(stop):
            if not isinstance(text, str) or not text:
                raise GenerationError(f"stop[{index}] is {_show(text)}; stop strings must be non-empty strings",
                                      hint='pass e.g. stop=["\\n\\n"]')
            if len(text) > MAX_STOP_CHARS:
                raise GenerationError(f"stop[{index}] is {len(text)} characters; at most {MAX_STOP_CHARS} are allowed",
                                      hint="pass shorter stop strings")
        self._stops = stop
        self._held = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """Text that is safe to emit now. After a stop string matched, `stopped` is True and
        the text before it is the last piece."""
        if self.stopped:
            return ""
        old, held = len(self._held), self._held + text
        # a match must end inside the new text: the held tail holds no whole stop string
        found = (held.find(s, max(0, old - len(s) + 1)) for s in self._stops)
        cut = min((i for i in found if i >= 0), default=-1)
        if cut >= 0:
            self.stopped, self._held = True, ""
            return held[:cut]
        keep = max((_overlap(held, s) for s in self._stops), default=0)
        self._held = held[len(held) - keep:]
        return held[:len(held) - keep]

    def flush(self) -> str:
        """At the end of the stream, the held-back tail (it never became a stop string)."""
        held, self._held = self._held, ""
        return "" if self.stopped else held


def _overlap(text: str, stop: str) -> int:
    """Length of the longest end of `text` that is a proper start of `stop`."""
    first = stop[0]
    index = text.find(first, max(0, len(text) - len(stop) + 1))
    while index >= 0:  # the earliest start that still matches is the longest overlap
        if stop.startswith(text[index:]):
            return len(text) - index
        index = text.find(first, index + 1)
    return 0


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
