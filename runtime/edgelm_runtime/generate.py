"""The generation loop: one prefill run for the prompt, then one run per token on the KV cache.

Also the two pieces that turn tokens into safe text: StopFilter cuts the output before the first
stop string and, while streaming, holds back any tail that may still grow into one; and
GenerationStats, the timings of the last generation (model runs and sampling only, not the
caller's time between tokens)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from time import perf_counter
from typing import TYPE_CHECKING, Literal

import numpy as np

from edgelm_runtime.constrained import TokenConstraint
from edgelm_runtime.errors import GenerationError
from edgelm_runtime.sampling import Sampler
from edgelm_runtime.kv_reuse import PrefixCache
from edgelm_runtime.lookup import PromptLookup
from edgelm_runtime.session import DecoderSession, Stepper

if TYPE_CHECKING:
    from edgelm_runtime.batch import BatchDecoder

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
    draft_tokens: int = 0     # prompt-lookup tokens proposed (SamplingParams.prompt_lookup)
    accepted_tokens: int = 0  # of those, the ones the model agreed with (kept without a run of their own)
    cached_tokens: int = 0    # prompt tokens whose KV came from an earlier run (kv_reuse.PrefixCache)


def decode_tokens(decoder: DecoderSession, prompt_ids: Sequence[int], max_new_tokens: int, sampler: Sampler,
                  eos_token_ids: Sequence[int], max_seq_len: int,
                  report: Callable[[GenerationStats], None] | None = None,
                  constraint: TokenConstraint | None = None,
                  observe: Callable[[np.ndarray, int], None] | None = None,
                  cache: PrefixCache | BatchDecoder | None = None) -> Iterator[int]:
    """Yield new token ids (eos excluded) until eos, max_new_tokens or the context is full.

    The sequence never exceeds max_seq_len tokens; `report` gets the stats when the loop ends,
    also when the caller closes the iterator early. `constraint` masks the logits before each
    sample and ends the loop (as eos) once its grammar is complete; `observe(logits, token)` sees
    each step's logits (as sampled from, the mask applied) and its token, eos included. With a
    `cache`, the prompt starts from the cached run sharing its longest prefix, and the run (prompt
    and output) goes back to the cache when the loop ends.

    Plain greedy decoding (no penalty, constraint or observer) with `sampler.params.prompt_lookup`
    > 0, on a bundle whose cache is one shared buffer, is speculative: a prompt-lookup draft
    (edgelm_runtime/lookup.py) is checked in one run of draft + 1 positions, the tokens the model
    itself picks are kept up to the first one the draft got wrong, and the cache is rewound past
    the rest. Each kept token is the argmax of its own position, so the output is plain greedy's
    wherever the graph's logits do not depend on how many positions one run computes (fp32: 12 of 12
    answers identical). Where activations are quantized at run time (int8/int4 profiles), a last-bit
    difference in attention can cross a rounding step and pick the other of two near-tied tokens,
    which is why those profiles leave it off by default (docs/decoding.md)."""
    eos = frozenset(eos_token_ids)
    start = perf_counter()
    capacity = min(max_seq_len, len(prompt_ids) + max_new_tokens)
    stepper = decoder.stepper(capacity) if cache is None else cache.take(prompt_ids, capacity, decoder.bound_inputs)
    cached = stepper.length
    logits = stepper.feed(np.asarray(prompt_ids[cached:], dtype=np.int64))
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
    produced, decoded, decode_s, reason = 0, 0, 0.0, "stopped"
    step_ids = np.zeros(1, dtype=np.int64)
    lookup = _lookup(sampler, constraint, observe, stepper, prompt_ids)
    drafted: list[int] = []  # tokens a verification kept: already in the cache, still to be yielded
    proposed = accepted = 0
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
            if drafted:
                token = drafted.pop(0)
                continue
            step = perf_counter()
            if lookup is not None:
                lookup.push(token)
                # room: the draft and the token fit in the run, and no more is drafted than may be yielded
                room = min(stepper.capacity - stepper.length - 1, max_new_tokens - produced - 1)
                draft = lookup.draft(room)
            else:
                draft = []
            if draft:
                token, drafted = _verify(stepper, token, draft, lookup)
                decoded += 1 + len(drafted)
                proposed, accepted = proposed + len(draft), accepted + len(drafted)
            else:
                step_ids[0] = token
                logits = stepper.feed(step_ids)
                sampled = perf_counter()
                token = pick(logits)
                sampling_s += perf_counter() - sampled
                decoded += 1
            decode_s += perf_counter() - step
            if drafted:  # the kept draft comes first; the model's own next token after it
                token, drafted = drafted[0], drafted[1:] + [token]
    finally:
        if cache is not None:
            cache.put(stepper)
        if report is not None:
            report(GenerationStats(
                prompt_tokens=len(prompt_ids), generated_tokens=produced, prefill_seconds=prefill_s,
                decode_seconds=decode_s, decode_tokens_per_s=decoded / decode_s if decode_s > 0 else 0.0,
                time_to_first_token_s=first_token_s, finish_reason=reason, sampling_seconds=sampling_s,
                draft_tokens=proposed, accepted_tokens=accepted, cached_tokens=cached))


def _lookup(sampler: Sampler, constraint: TokenConstraint | None, observe: object, stepper: Stepper,
            prompt_ids: Sequence[int]) -> PromptLookup | None:
    """A prompt lookup where speculation is exact: plain greedy argmax of each position's logits."""
    p = sampler.params
    plain_greedy = p.temperature == 0 and p.repetition_penalty == 1.0 and not sampler.counts_tokens
    if not (p.prompt_lookup and plain_greedy and constraint is None and observe is None
            and getattr(stepper, "can_verify", False)):
        return None
    return PromptLookup(prompt_ids, p.prompt_lookup)


def _verify(stepper: Stepper, token: int, draft: list[int], lookup: PromptLookup) -> tuple[int, list[int]]:
    """Run `token` + `draft` at once; (the model's next token, the draft tokens it agreed with).
    The cache keeps `token` and the agreed tokens; the rest is rewound."""
    start = stepper.length
    picks = np.argmax(stepper.verify(np.asarray([token, *draft], dtype=np.int64)), axis=-1)
    kept = 0
    while kept < len(draft) and draft[kept] == picks[kept]:
        kept += 1
    stepper.rewind(start + 1 + kept)
    lookup.accepted(len(draft), kept)
    for agreed in draft[:kept]:
        lookup.push(agreed)
    return int(picks[kept]), draft[:kept]


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
