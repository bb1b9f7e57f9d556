"""Drive fixed-shape NPU graphs: chunked prefill, one-token decode, a capped KV window.

An NPU graph (manifest `static`) has one shape per graph, so the runtime plans the work: a prompt
goes through the prefill graph `prefill_len` tokens at a time (the last chunk padded), a single
token through the decode graph, and the KV cache is a fixed window of `kv_window` slots that the
graphs' new rows are written into. An additive bias tells each query which slots it may attend
to (filled slots, and the chunk's earlier tokens), so padding and empty slots never leak in. The
window is capped, not slid: `kv_window` is the context limit, and going past it is an error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from edgelm_runtime.bundle import MANIFEST_FILE, Manifest, ModelIO, StaticLayout
from edgelm_runtime.errors import BundleError, GenerationError


def open_static_sessions(prefill: Path, decode: Path, options: ort.SessionOptions | None = None,
                         providers: list[str] | None = None) -> tuple[ort.InferenceSession, ort.InferenceSession]:
    if options is None:
        options = ort.SessionOptions()
        options.log_severity_level = 3
    providers = providers or ["CPUExecutionProvider"]
    return (ort.InferenceSession(str(prefill), sess_options=options, providers=providers),
            ort.InferenceSession(str(decode), sess_options=options, providers=providers))


class StaticWindow:
    """One sequence's KV window and the runs that fill it. `feed` takes any number of tokens."""

    def __init__(self, prefill: ort.InferenceSession, decode: ort.InferenceSession, layout: StaticLayout,
                 num_layers: int, kv_heads: int, head_dim: int, dtype: Any, io: ModelIO = ModelIO(),
                 past: list[np.ndarray] | None = None) -> None:
        self._graphs = {layout.prefill_len: prefill, 1: decode}
        self._layout, self._io = layout, io
        self._past_names = [name.format(i=i) for i in range(num_layers) for name in (io.past_key, io.past_value)]
        shape = (1, kv_heads, layout.kv_window, head_dim)
        self.cache = [np.zeros(shape, dtype=dtype) for _ in self._past_names]
        self.length = 0
        if past is not None:  # (1, kv_heads, P, head_dim) each: what an earlier run produced
            self.length = past[0].shape[2]
            if self.length > layout.kv_window:
                raise GenerationError(f"the sequence is {self.length} tokens; this bundle's window holds "
                                      f"{layout.kv_window}", hint="shorten the prompt")
            for slot, rows in zip(self.cache, past):
                slot[:, :, :self.length] = rows

    @property
    def capacity(self) -> int:
        return self._layout.kv_window

    def feed(self, tokens: np.ndarray, all_logits: bool = False) -> np.ndarray:
        """Run `tokens` (S,) after what was fed before; logits (V,) of the last one, or (S, V)."""
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        window = self._layout.kv_window
        if self.length + len(tokens) > window:
            raise GenerationError(f"the sequence would be {self.length + len(tokens)} tokens; this bundle's "
                                  f"KV window holds {window}", hint="ask for fewer new tokens or a shorter prompt")
        pieces, start = [], 0
        while start < len(tokens):
            count = min(self._layout.prefill_len, len(tokens) - start)
            logits = self._run(tokens[start:start + count])
            pieces.append(logits if all_logits else logits[-1:])
            start += count
        return np.concatenate(pieces) if all_logits else pieces[-1][-1]

    def _run(self, chunk: np.ndarray) -> np.ndarray:
        count = len(chunk)
        seq = 1 if count == 1 else self._layout.prefill_len
        window, length = self._layout.kv_window, self.length
        ids = np.full((1, seq), chunk[-1], dtype=np.int32)
        ids[0, :count] = chunk
        positions = (length + np.arange(seq, dtype=np.int32))[None]
        bias = np.full((1, 1, seq, window + seq), self._layout.mask_value, dtype=np.float32)
        bias[..., :length] = 0.0
        bias[0, 0, :, window:] = np.where(np.tri(seq, dtype=bool), 0.0, self._layout.mask_value)
        feed = {self._io.input_ids: ids, self._io.position_ids: positions, self._layout.attention_bias: bias,
                **dict(zip(self._past_names, self.cache))}
        logits, *rows = self._graphs[seq].run(None, feed)
        for slot, new in zip(self.cache, rows):
            slot[:, :, length:length + count] = new[:, :, :count]
        self.length = length + count
        return logits[0, :count].astype(np.float32, copy=False)


class StaticDecoderSession:
    """DecoderSession's interface (run, stepper, empty_past) over the two fixed-shape graphs."""

    def __init__(self, prefill: ort.InferenceSession, decode: ort.InferenceSession, manifest: Manifest) -> None:
        self._prefill, self._decode = prefill, decode
        self._layout, self._kv, self._io = manifest.static, manifest.kv, manifest.io
        self._kv_dtype = np.dtype(manifest.kv.dtype)
        self._vocab_size = manifest.vocab_size
        _check_static_graph(prefill, manifest, manifest.static.prefill_len, manifest.model_file)
        _check_static_graph(decode, manifest, 1, manifest.static.decode_model_file)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def providers(self) -> list[str]:
        return self._prefill.get_providers()

    def _window(self, past: list[np.ndarray] | None = None) -> StaticWindow:
        kv = self._kv
        return StaticWindow(self._prefill, self._decode, self._layout, kv.num_layers, kv.num_kv_heads,
                            kv.head_dim, self._kv_dtype, self._io, past)

    bound_inputs = None

    def stepper(self, capacity: int, inputs: object = None) -> StaticWindow:
        if inputs is not None:
            raise GenerationError("run-time adapters are not supported on fixed-shape (static) bundles",
                                  hint="build the adapter into the bundle (--adapter-mode merge)")
        if capacity > self._layout.kv_window:
            raise GenerationError(f"the sequence would be {capacity} tokens; this bundle's KV window holds "
                                  f"{self._layout.kv_window}", hint="ask for fewer new tokens or a shorter prompt")
        return self._window()

    def empty_past(self, batch: int) -> list[np.ndarray]:
        shape = (batch, self._kv.num_kv_heads, 0, self._kv.head_dim)
        return [np.zeros(shape, dtype=self._kv_dtype) for _ in range(2 * self._kv.num_layers)]

    def run(self, input_ids: np.ndarray, past: list[np.ndarray] | None = None,
            last_only: bool = False) -> tuple[np.ndarray, list[np.ndarray]]:
        """As DecoderSession.run: each batch row runs in its own window; present = past + new rows."""
        logits, present = [], []
        for row in range(input_ids.shape[0]):
            window = self._window(None if past is None else [p[row:row + 1] for p in past])
            start = window.length
            out = window.feed(input_ids[row], all_logits=True)
            logits.append(out[-1:] if last_only else out)
            present.append([slot[:, :, :start + input_ids.shape[1]].copy() for slot in window.cache])
        return np.stack(logits), [np.concatenate(layer) for layer in zip(*present)]


def _check_static_graph(session: ort.InferenceSession, manifest: Manifest, seq: int, file: str) -> None:
    """The graph's fixed shapes must be the manifest's: else the runtime feeds the wrong sizes."""
    layout, kv, io = manifest.static, manifest.kv, manifest.io
    expected = {io.input_ids: [1, seq], io.position_ids: [1, seq],
                layout.attention_bias: [1, 1, seq, layout.kv_window + seq],
                io.past_key.format(i=0): [1, kv.num_kv_heads, layout.kv_window, kv.head_dim]}
    shapes = {i.name: i.shape for i in session.get_inputs()}
    for name, shape in expected.items():
        if name not in shapes:
            raise BundleError(f"{file} has no input {name!r} named in {MANIFEST_FILE} static",
                              hint="the manifest does not match the model; rebuild the bundle")
        if shapes[name] != shape:
            raise BundleError(f"{file}: input {name} has shape {shapes[name]}, {MANIFEST_FILE} static says {shape}",
                              hint="the manifest does not match the model; rebuild the bundle")
