"""Open the bundle's ONNX decoder in onnxruntime and run one step of it.

Everything comes from the manifest (provider, session options, I/O names, KV layout); the graph is
only checked against it, never used to guess. One graph serves the prefill (empty past) and each
decode step (past = the previous step's present tensors, handed back as they came out)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgelm_runtime.bundle import MANIFEST_FILE, Manifest
from edgelm_runtime.errors import BundleError

_OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
_SESSION_OPTION_KEYS = ("graph_optimization_level", "intra_op_threads")
_KV_DTYPES = ("float32", "float16")


def session_options(manifest: Manifest, threads: int | None = None) -> ort.SessionOptions:
    """onnxruntime options from `manifest.session_options`; `threads` overrides intra_op_threads."""
    where = f"{MANIFEST_FILE}: session_options"
    values = manifest.session_options
    unknown = sorted(set(values) - set(_SESSION_OPTION_KEYS))
    if unknown:
        raise BundleError(f"{where}.{unknown[0]}: unknown option (known: {', '.join(_SESSION_OPTION_KEYS)})",
                          hint="rebuild the bundle, or upgrade edgelm-runtime if a newer edgelm wrote it")
    level = values.get("graph_optimization_level", "all")
    if level not in _OPTIMIZATION_LEVELS:
        raise BundleError(f"{where}.graph_optimization_level: {level!r} is not one of "
                          f"{', '.join(_OPTIMIZATION_LEVELS)}", hint="fix the manifest or rebuild the bundle")
    intra = values.get("intra_op_threads", 0) if threads is None else threads
    if not isinstance(intra, int) or isinstance(intra, bool) or intra < 0:
        raise BundleError(f"intra_op_threads: {intra!r} is not a whole number >= 0",
                          hint="pass threads=N (0 lets onnxruntime choose)")
    options = ort.SessionOptions()
    options.graph_optimization_level = _OPTIMIZATION_LEVELS[level]
    options.intra_op_num_threads = intra
    options.inter_op_num_threads = 1  # one decoder graph run at a time: no parallel branches to feed
    return options


def open_decoder(model_path: Path, manifest: Manifest, threads: int | None = None) -> DecoderSession:
    """An InferenceSession on the manifest's provider, checked against the manifest's I/O names."""
    available = ort.get_available_providers()
    if manifest.provider not in available:
        raise BundleError(f"provider {manifest.provider} is not available in this onnxruntime "
                          f"(available: {', '.join(available)})",
                          hint=f"install an onnxruntime build with {manifest.provider}, "
                               "or build a bundle with a profile for this machine")
    if manifest.kv.dtype not in _KV_DTYPES:
        raise BundleError(f"{MANIFEST_FILE}: kv.dtype {manifest.kv.dtype!r} is not one of "
                          f"{', '.join(_KV_DTYPES)}", hint="rebuild the bundle")
    options = session_options(manifest, threads)
    try:
        session = ort.InferenceSession(str(model_path), sess_options=options, providers=[manifest.provider])
    except Exception as exc:  # onnxruntime's pybind errors (Fail, InvalidGraph, ...) derive from Exception only
        raise BundleError(f"{model_path}: onnxruntime could not load the model ({exc})",
                          hint="the file is corrupt or needs a newer onnxruntime; "
                               "check it with verify=True, or rebuild the bundle") from None
    return DecoderSession(session, manifest)


class DecoderSession:
    """One decoder graph with a KV cache: `run(input_ids, past) -> (logits, present)`."""

    def __init__(self, session: ort.InferenceSession, manifest: Manifest) -> None:
        io, kv = manifest.io, manifest.kv
        self._session = session
        self._kv = kv
        self._kv_dtype = np.dtype(kv.dtype)
        layers = range(kv.num_layers)
        self._past_names = [name.format(i=i) for i in layers for name in (io.past_key, io.past_value)]
        self._present_names = [name.format(i=i) for i in layers for name in (io.present_key, io.present_value)]
        self._io = io
        self._output_names = [io.logits, *self._present_names]
        optional = [name for name in (io.position_ids, io.logits_to_keep) if name]
        inputs = [io.input_ids, io.attention_mask, *optional, *self._past_names]
        graph_inputs = {i.name for i in session.get_inputs()}
        _check_names("input", inputs, graph_inputs)
        unfed = sorted(graph_inputs - set(inputs))
        if unfed:
            raise BundleError(f"the model input {unfed[0]!r} is not named in {MANIFEST_FILE} io",
                              hint="the manifest does not match model.onnx; rebuild the bundle")
        _check_names("output", self._output_names, {o.name for o in session.get_outputs()})

    @property
    def providers(self) -> list[str]:
        return self._session.get_providers()

    def empty_past(self, batch: int) -> list[np.ndarray]:
        shape = (batch, self._kv.num_kv_heads, 0, self._kv.head_dim)
        return [np.zeros(shape, dtype=self._kv_dtype) for _ in self._past_names]

    def run(self, input_ids: np.ndarray, past: list[np.ndarray] | None = None,
            last_only: bool = False) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits (B, S, V) float32 for `input_ids` (B, S) int64 after `past`, and the new present tensors.

        `past` is [layer0 key, layer0 value, layer1 key, ...]; None means an empty cache. Pass the
        returned present list as the next call's past: the prompt is never run twice. last_only:
        logits (B, 1, V) of the last position only (what generation needs; much less work)."""
        batch, seq = input_ids.shape
        if past is None:
            past = self.empty_past(batch)
        past_len = past[0].shape[2]
        io = self._io
        feed = {
            io.input_ids: np.ascontiguousarray(input_ids, dtype=np.int64),
            io.attention_mask: np.ones((batch, past_len + seq), dtype=np.int64),
        }
        if io.position_ids:
            feed[io.position_ids] = np.tile(np.arange(past_len, past_len + seq, dtype=np.int64), (batch, 1))
        if io.logits_to_keep:
            feed[io.logits_to_keep] = np.asarray([1 if last_only else seq], dtype=np.int64)
        feed.update(zip(self._past_names, past))
        logits, *present = self._session.run(self._output_names, feed)
        if last_only:
            logits = logits[:, -1:]
        return logits.astype(np.float32, copy=False), present


def _check_names(kind: str, wanted: list[str], have: set[str]) -> None:
    missing = [name for name in wanted if name not in have]
    if missing:
        raise BundleError(f"the model has no {kind} {missing[0]!r} named in {MANIFEST_FILE} io "
                          f"(it has: {', '.join(sorted(have))})",
                          hint="the manifest does not match model.onnx; rebuild the bundle")
