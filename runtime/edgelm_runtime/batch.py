"""Continuous batching: concurrent generations share one model run per decode step.

Decode on a CPU at batch 1 reads every weight once per token, so a second sequence in the same run
costs little more than the first. Each sequence keeps its own decode loop (generate.decode_tokens:
its sampler, grammar, stop strings, cancellation) in its own thread; only the model run is shared.
A sequence prefills alone on a stepper of its own (from the prefix cache when one matches), then
joins: its KV moves into a row of the batch's cache, and from then on each of its `feed` calls
waits for the next batched step. The engine thread runs a step once every sequence in the batch
has asked for one (or BATCH_WAIT_S after the first did), so sequences join and leave at step
boundaries. GroupQueryAttention reads each row's own length from the attention mask (a row's
ones, then zeros), so rows of different lengths share a run; position ids, where the graph takes
them, are per row.

Hand-written: onnxruntime runs a graph, not a batch of generations; onnxruntime-genai batches only
requests that start together. The engine is one thread, one condition variable and row copies."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import onnxruntime as ort

from edgelm_runtime.errors import GenerationError
from edgelm_runtime.kv_reuse import PrefixCache
from edgelm_runtime.session import DecoderSession, Stepper

BATCH_WAIT_S = 0.02  # the longest a ready sequence waits for the others before a step runs without them


class BatchSlot:
    """One sequence of a BatchDecoder, with a Stepper's interface for decode_tokens: the first
    `feed` is the prompt (run alone), each later one a single token (run in the batch)."""

    can_verify = False  # a draft would make this row's run longer than the others'

    def __init__(self, engine: BatchDecoder, stepper: Stepper) -> None:
        self._engine, self.stepper = engine, stepper
        self.capacity = stepper.capacity
        self.length = stepper.length
        self.row: int | None = None
        self.next_token = 0
        self.logits: np.ndarray | None = None
        self.error: BaseException | None = None
        self.done = threading.Event()

    def feed(self, token_ids: np.ndarray) -> np.ndarray:
        if self.row is None:
            logits = self.stepper.feed(token_ids)
            self.length = self.stepper.length
            self._engine.admit(self)
            return logits
        if len(token_ids) != 1 or self.length + 1 > self.capacity:
            raise GenerationError(f"a batched sequence takes one token per step within {self.capacity} positions",
                                  hint="ask for fewer new tokens")
        logits = self._engine.step(self, int(token_ids[0]))
        self.length += 1
        self.stepper.tokens.append(int(token_ids[0]))  # the row's cache, for reuse when it leaves
        return logits


class BatchDecoder:
    """Up to `slots` sequences decoding together on `decoder` (a shared-buffer KV cache on the
    host); more wait, prefilled, for a row to free. `take`/`put` mirror PrefixCache's, so
    decode_tokens runs on either."""

    def __init__(self, decoder: DecoderSession, slots: int, max_seq_len: int, cache: PrefixCache | None = None) -> None:
        if slots < 1:
            raise GenerationError(f"a batch of {slots} slots is not valid", hint="pass --parallel 1 or more")
        if not decoder.host_shared_cache:
            raise GenerationError("this bundle's KV cache cannot be batched (it needs a shared KV buffer on the host)",
                                  hint="serve it with --parallel 1")
        kv, io = decoder._kv, decoder._io
        self._decoder, self._io, self.slots, self._cache = decoder, io, slots, cache
        self._arrays = [np.zeros((slots, kv.num_kv_heads, max_seq_len, kv.head_dim), dtype=decoder._kv_dtype)
                        for _ in decoder._past_names]
        self._logits = np.zeros((slots, 1, decoder.vocab_size), dtype=np.float32)
        self._rows: list[BatchSlot] = []        # in the batch, in row order (engine thread only)
        self._ready: list[BatchSlot] = []       # asked for a step
        self._joining: list[BatchSlot] = []     # prefilled, waiting for a row
        self._leaving: list[BatchSlot] = []
        self._bindings: dict[int, Any] = {}     # batch size -> an IO binding of the first rows
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self.steps = 0

    @property
    def cache_bytes(self) -> int:
        return sum(array.nbytes for array in self._arrays)

    def take(self, prompt_ids: list[int], capacity: int, inputs: dict[str, ort.OrtValue] | None = None) -> Any:
        """A slot for a new sequence; with bound `inputs` (a runtime adapter) a plain stepper,
        unbatched (the batch's rows share one set of graph inputs)."""
        stepper = self._cache.take(prompt_ids, capacity, inputs) if self._cache else \
            self._decoder.stepper(capacity, inputs)
        return stepper if inputs is not None else BatchSlot(self, stepper)

    def put(self, slot: Any) -> None:
        """The sequence ended: its row is freed at the next step boundary (its cache kept for reuse)."""
        if not isinstance(slot, BatchSlot):
            if self._cache is not None:
                self._cache.put(slot)
            return
        with self._lock:
            if slot.row is None and slot not in self._joining:  # ended before it joined
                self._keep(slot)
                return
            self._leaving.append(slot)
            self._lock.notify_all()
            while slot.row != -1:  # freed at the step boundary; its cache is then back for reuse
                self._lock.wait()

    def admit(self, slot: BatchSlot) -> None:
        with self._lock:
            self._start()
            self._joining.append(slot)
            self._lock.notify_all()
            while slot.row is None:
                self._lock.wait()

    def step(self, slot: BatchSlot, token: int) -> np.ndarray:
        slot.next_token, slot.logits, slot.error = token, None, None
        slot.done.clear()
        with self._lock:
            self._ready.append(slot)
            self._lock.notify_all()
        slot.done.wait()
        if slot.error is not None:
            raise slot.error
        return slot.logits

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="edgelm-batch", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            try:
                self._next()
            except BaseException as exc:  # never leave a sequence waiting on a dead engine
                with self._lock:
                    ready, self._ready = self._ready, []
                for slot in ready:
                    slot.error = GenerationError(f"the batch engine failed: {exc}", hint="see the server log")
                    slot.done.set()

    def _next(self) -> None:
        with self._lock:
            self._membership()
            while not self._ready:
                self._lock.wait()
                self._membership()
            deadline = time.monotonic() + BATCH_WAIT_S
            while True:
                self._membership()
                waiting = [s for s in self._rows if s not in self._ready]
                left = deadline - time.monotonic()
                if not waiting or left <= 0:
                    break
                self._lock.wait(left)
            batch, self._ready = list(self._ready), []
        self._run(batch)

    def _membership(self) -> None:
        """Rows freed and joined between steps (engine thread, lock held)."""
        for slot in self._leaving:
            self._free(slot)
        if self._leaving:
            self._leaving.clear()
            self._lock.notify_all()
        joined = 0
        for slot in self._joining[:self.slots - len(self._rows)]:  # the rest wait for a row to free
            slot.row = len(self._rows)
            for batch, single in zip(self._arrays, slot.stepper._arrays):
                batch[slot.row, :, :slot.length] = single[0, :, :slot.length]
            self._rows.append(slot)
            joined += 1
        if joined:
            del self._joining[:joined]
            self._lock.notify_all()

    def _free(self, slot: BatchSlot) -> None:
        row, last = slot.row, len(self._rows) - 1
        stepper, start = slot.stepper, slot.stepper.length
        end = min(slot.length, stepper.capacity)
        for batch, single in zip(self._arrays, stepper._arrays):  # the output's KV back, for reuse
            single[0, :, start:end] = batch[row, :, start:end]
        stepper.length = end
        self._keep(slot)
        if row != last:  # the last row moves into the gap: the batch stays rows 0..n-1
            moved = self._rows[last]
            for batch in self._arrays:
                batch[row, :, :moved.length] = batch[last, :, :moved.length]
            moved.row, self._rows[row] = row, moved
        self._rows.pop()
        slot.row = -1

    def _keep(self, slot: BatchSlot) -> None:
        del slot.stepper.tokens[slot.stepper.length:]  # what its cache holds after the copy back
        if self._cache is not None:
            self._cache.put(slot.stepper)

    def _order(self, batch: list[BatchSlot]) -> None:
        """Move the rows that asked for this step to the front (engine thread, rarely needed)."""
        for target, slot in enumerate(sorted(batch, key=lambda s: s.row)):
            if slot.row != target:
                other = self._rows[target]
                span = max(slot.length, other.length)
                for array in self._arrays:
                    array[[target, slot.row], :, :span] = array[[slot.row, target], :, :span]
                self._rows[target], self._rows[slot.row] = slot, other
                other.row, slot.row = slot.row, target

    def _run(self, batch: list[BatchSlot]) -> None:
        with self._lock:
            self._order(batch)
        n, io = len(batch), self._io
        batch.sort(key=lambda s: s.row)
        try:
            binding = self._binding(n)
            lengths = np.asarray([slot.length for slot in batch], dtype=np.int64)
            total = int(lengths.max()) + 1
            mask = (np.arange(total)[None, :] <= lengths[:, None]).astype(np.int64)
            binding.bind_cpu_input(io.input_ids, np.asarray([[s.next_token] for s in batch], dtype=np.int64))
            binding.bind_cpu_input(io.attention_mask, mask)
            if io.position_ids:
                binding.bind_cpu_input(io.position_ids, lengths[:, None].copy())
            self._decoder._session.run_with_iobinding(binding)
            self.steps += 1
            for slot in batch:
                slot.logits = self._logits[slot.row, -1].copy()  # its thread samples while the next step runs
        except BaseException as exc:  # each waiting sequence raises it; the engine goes on
            for slot in batch:
                slot.error = GenerationError(f"the batched step failed: {exc}", hint="see the server log")
        for slot in batch:
            slot.done.set()

    def _binding(self, n: int) -> Any:
        if n not in self._bindings:
            binding = self._decoder._session.io_binding()
            io = self._io
            binding.bind_cpu_input(io.logits_to_keep, np.ones(1, dtype=np.int64))
            binding.bind_ortvalue_output(io.logits, ort.OrtValue.ortvalue_from_numpy(self._logits[:n]))
            for past, present, array in zip(self._decoder._past_names, self._decoder._present_names, self._arrays):
                value = ort.OrtValue.ortvalue_from_numpy(array[:n])
                binding.bind_ortvalue_input(past, value)
                binding.bind_ortvalue_output(present, value)
            self._bindings[n] = binding
        return self._bindings[n]
