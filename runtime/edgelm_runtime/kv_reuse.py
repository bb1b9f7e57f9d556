"""Prefix KV reuse: keep the KV caches of recent runs, and start a new prompt from the one that
shares the longest prefix with it, so only the new tokens run.

A chat resends its whole history every turn, and few-shot classification repeats its instruction
and examples on every call; both then pay the prefill of what they ran before. As llama-server's
`cache_prompt`, the cache is matched by token ids, so it needs no session object: any prompt that
begins with a cached run's tokens reuses them, one that was trimmed (fit_history) or edited reuses
up to the first token that changed, and a prompt with nothing in common starts cold.

Hand-written: onnxruntime has no prompt cache; onnxruntime-genai's generator keeps one sequence's
cache but does not match prompts. This is an LRU of Steppers bounded in bytes."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from edgelm_runtime.errors import GenerationError
from edgelm_runtime.session import DecoderSession, Stepper

ROOM_STEP = 256            # capacities are rounded up to this: a next, longer turn often still fits
DEFAULT_BUDGET_MB = 128    # LanguageModel's default; `edgelm serve --kv-cache-mb` sets the server's
MAX_ENTRIES = 8


class PrefixCache:
    """Up to `budget_bytes` of idle KV caches, least recently used evicted first. `take` hands one
    out (removed from the cache while it runs), `put` gives it back."""

    def __init__(self, decoder: DecoderSession, budget_bytes: int, max_seq_len: int,
                 max_entries: int = MAX_ENTRIES) -> None:
        if budget_bytes < 0 or max_entries < 1:
            raise GenerationError(f"a KV cache budget of {budget_bytes} bytes and {max_entries} entries is not valid",
                                  hint="pass a budget >= 0 (0 turns reuse off)")
        self._decoder, self.budget_bytes, self.max_entries = decoder, budget_bytes, max_entries
        self.max_seq_len = max_seq_len  # capacities are never rounded up past the context
        self._entries: list[Stepper] = []  # oldest first
        self._lock = threading.Lock()

    @classmethod
    def for_decoder(cls, decoder: Any, budget_mb: float, max_seq_len: int) -> PrefixCache | None:
        """A cache for `decoder`, or None where reuse cannot work (a fixed-shape graph, a cache
        on an accelerator, a graph without a shared KV buffer) or is turned off (budget 0)."""
        if budget_mb <= 0 or not isinstance(decoder, DecoderSession) or not decoder.host_shared_cache:
            return None
        return cls(decoder, int(budget_mb * 2**20), max_seq_len)

    @property
    def cached_bytes(self) -> int:
        with self._lock:
            return sum(entry.cache_bytes for entry in self._entries)

    def take(self, prompt_ids: list[int], capacity: int, inputs: Any = None) -> Stepper:
        """A stepper whose cache holds the longest cached prefix of `prompt_ids` (never all of
        it: the last prompt token must run to give the next token's logits), with room for
        `capacity` positions; feed it `prompt_ids[stepper.length:]`. Runs with other bound
        `inputs` (another adapter's tensors) never match."""
        capacity = max(capacity, min(_rounded(capacity), self.max_seq_len))
        with self._lock:
            best, shared = None, 0
            for entry in self._entries:
                if entry.inputs is inputs:
                    length = _common_prefix(entry.tokens, prompt_ids, len(prompt_ids) - 1)
                    if length > shared:
                        best, shared = entry, length
            if best is not None:
                self._entries.remove(best)
        if best is None:
            return self._decoder.stepper(capacity, inputs)
        best.rewind(shared)
        return best if best.capacity >= capacity else best.grown(capacity)

    def put(self, stepper: Stepper) -> None:
        """Keep `stepper`'s cache for later prompts, evicting the least recently used beyond the budget."""
        if not stepper.reusable or stepper.length == 0 or stepper.cache_bytes > self.budget_bytes:
            return
        with self._lock:
            self._entries.append(stepper)
            while len(self._entries) > self.max_entries or \
                    sum(entry.cache_bytes for entry in self._entries) > self.budget_bytes:
                self._entries.pop(0)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


def _rounded(capacity: int) -> int:
    return -(-capacity // ROOM_STEP) * ROOM_STEP


def _common_prefix(cached: list[int], prompt: list[int], limit: int) -> int:
    """How many leading tokens `cached` and `prompt` share, at most `limit`."""
    n = min(len(cached), limit)
    if n <= 0:
        return 0
    differ = np.flatnonzero(np.asarray(cached[:n]) != np.asarray(prompt[:n]))
    return int(differ[0]) if differ.size else n
