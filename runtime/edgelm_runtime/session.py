"""Open the bundle's ONNX decoder in onnxruntime and run one step of it.

Everything comes from the manifest (provider, provider and session options, I/O names, KV layout); the graph is
only checked against it, never used to guess. One graph serves the prefill (empty past) and each
decode step (past = the previous step's present tensors, handed back as they came out)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from edgelm_runtime.bundle import MANIFEST_FILE, Manifest
from edgelm_runtime.errors import BundleError, GenerationError

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
    if not isinstance(level, str) or level not in _OPTIMIZATION_LEVELS:
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
    if getattr(manifest, "runtime_adapters", ()):
        # each optional LoRA input has a default initializer, and onnxruntime warns about every one
        # at load ("initializer appears in graph inputs": ~420 lines for SmolLM2); errors still show
        options.log_severity_level = 3
    return options


def open_decoder(model_path: Path, manifest: Manifest, threads: int | None = None,
                 provider: str | None = None, decode_path: Path | None = None) -> Any:
    """An InferenceSession on the manifest's provider (or `provider`, e.g. CPUExecutionProvider to
    check a GPU bundle on a machine without one), checked against the manifest's I/O names. Ops
    the provider lacks fall back to the CPU, as onnxruntime does when both are listed."""
    chosen = available_provider(provider or manifest.provider)
    if manifest.kv.dtype not in _KV_DTYPES:
        raise BundleError(f"{MANIFEST_FILE}: kv.dtype {manifest.kv.dtype!r} is not one of "
                          f"{', '.join(_KV_DTYPES)}", hint="rebuild the bundle")
    options = session_options(manifest, threads)
    providers = session_providers(manifest, chosen)
    session = create_session(model_path, options, providers)
    if manifest.static is not None:  # fixed-shape NPU graphs: a prefill graph and a decode graph
        from edgelm_runtime.static import StaticDecoderSession

        if decode_path is None:
            raise BundleError(f"{MANIFEST_FILE}: static bundles need the decode graph's path",
                              hint="open the bundle with load_bundle()")
        return StaticDecoderSession(session, create_session(decode_path, options, providers), manifest)
    return DecoderSession(session, manifest)


def session_providers(manifest: Manifest, chosen: str) -> list[str | tuple[str, dict[str, Any]]]:
    """InferenceSession's `providers`: `chosen`, then the CPU (for the ops `chosen` lacks), each as
    (name, options) where `manifest.provider_options` has options for it, else by name."""
    names = [chosen] if chosen == "CPUExecutionProvider" else [chosen, "CPUExecutionProvider"]
    return [(name, dict(manifest.provider_options[name])) if manifest.provider_options.get(name) else name
            for name in names]


def available_provider(chosen: str) -> str:
    """`chosen`, if this onnxruntime has it; else a BundleError naming the ways out."""
    available = ort.get_available_providers()
    if chosen not in available:
        raise BundleError(f"provider {chosen} is not available in this onnxruntime "
                          f"(available: {', '.join(available)})",
                          hint=f"install an onnxruntime build with {chosen}; or run it here on the CPU "
                               "(load_bundle(..., provider='CPUExecutionProvider'), --provider CPUExecutionProvider); "
                               "or build a bundle with a profile for this machine")
    return chosen


def create_session(model_path: Path, options: ort.SessionOptions, providers: list[Any]) -> ort.InferenceSession:
    """An InferenceSession on `model_path`; a file onnxruntime cannot load is a BundleError."""
    try:
        return ort.InferenceSession(str(model_path), sess_options=options, providers=providers)
    except Exception as exc:  # onnxruntime's pybind errors (Fail, InvalidGraph, ...) derive from Exception only
        raise BundleError(f"{model_path}: onnxruntime could not load the model ({exc})",
                          hint="the file is corrupt or needs a newer onnxruntime; "
                               "check it with verify=True, or rebuild the bundle") from None


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
        self._vocab_size = manifest.vocab_size
        self._output_names = [io.logits, *self._present_names]
        optional = [name for name in (io.position_ids, io.logits_to_keep) if name]
        inputs = [io.input_ids, io.attention_mask, *optional, *self._past_names]
        graph_inputs = {i.name for i in session.get_inputs()}
        check_names("input", inputs, graph_inputs)
        unfed = sorted(graph_inputs - set(inputs))
        if unfed:
            raise BundleError(f"the model input {unfed[0]!r} is not named in {MANIFEST_FILE} io",
                              hint="the manifest does not match model.onnx; rebuild the bundle")
        check_names("output", self._output_names, {o.name for o in session.get_outputs()})
        _check_kv_shape(session, self._past_names[0], kv)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def providers(self) -> list[str]:
        return self._session.get_providers()

    @property
    def host_shared_cache(self) -> bool:
        """Whether its steppers keep the KV cache in one shared buffer on the host, which prefix
        reuse (kv_reuse.py) and batching (batch.py) copy, rewind and move between steppers."""
        return bool(self._kv.share_buffer and self._io.logits_to_keep
                    and cache_device(self._session) == "cpu")

    @property
    def bound_inputs(self) -> dict[str, ort.OrtValue] | None:
        """Extra graph inputs every stepper binds (a runtime adapter's tensors: adapters.py)."""
        return None

    def stepper(self, capacity: int, inputs: dict[str, ort.OrtValue] | None = None) -> Stepper:
        """A single-sequence runner for generation, bound once with onnxruntime's IO binding;
        `inputs` (default: bound_inputs) are bound to every run beside the decoder's own."""
        return Stepper(self, capacity, self.bound_inputs if inputs is None else inputs)

    def empty_past(self, batch: int) -> list[np.ndarray]:
        shape = (batch, self._kv.num_kv_heads, 0, self._kv.head_dim)
        return [np.zeros(shape, dtype=self._kv_dtype) for _ in self._past_names]

    def run(self, input_ids: np.ndarray, past: list[np.ndarray] | None = None,
            last_only: bool = False, run_options: ort.RunOptions | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
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
        logits, *present = self._session.run(self._output_names, feed, run_options)
        if last_only:
            logits = logits[:, -1:]
        return logits.astype(np.float32, copy=False), present


def _check_kv_shape(session: ort.InferenceSession, name: str, kv: Any) -> None:
    """The graph's past input is (batch, kv_heads, past_seq, head_dim): where it fixes heads and
    head_dim, the manifest's KV layout must agree (else the cache is allocated wrong)."""
    shape = next(i.shape for i in session.get_inputs() if i.name == name)
    for axis, field, value in ((1, "num_kv_heads", kv.num_kv_heads), (3, "head_dim", kv.head_dim)):
        if len(shape) == 4 and isinstance(shape[axis], int) and shape[axis] != value:
            raise BundleError(f"{MANIFEST_FILE}: kv.{field} is {value} but model.onnx's {name} has {shape[axis]}",
                              hint="the manifest does not match model.onnx; rebuild the bundle")


def check_names(kind: str, wanted: list[str], have: set[str], section: str = "io") -> None:
    """Every name in `wanted` is one of the graph's `have` (its inputs or outputs)."""
    missing = [name for name in wanted if name not in have]
    if missing:
        raise BundleError(f"the model has no {kind} {missing[0]!r} named in {MANIFEST_FILE} {section} "
                          f"(it has: {', '.join(sorted(have))})",
                          hint="the manifest does not match model.onnx; rebuild the bundle")


# where an execution provider keeps tensors (IO binding device names); anything else: the host
_PROVIDER_DEVICES = {"CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "cuda"}


def cache_device(session: ort.InferenceSession) -> str:
    """The device of the session's first provider: where the KV cache should live."""
    return _PROVIDER_DEVICES.get(session.get_providers()[0], "cpu")


class Stepper:
    """Runs one sequence forward, token chunk by token chunk, returning last-position logits.

    Why not `DecoderSession.run`: that hands numpy arrays in and out, so every step copies the
    whole KV cache (twice) and the logits. Here inputs and outputs are bound once with IO binding
    to buffers that live as long as the stepper. When the manifest says the attention op shares
    past and present (GroupQueryAttention), each layer's K and V is one preallocated buffer of
    `capacity` positions that the op appends to in place: no per-step allocation or copy at all.
    Otherwise the present tensors onnxruntime allocates are bound back as the next past, never
    converted to numpy. The returned logits (V,) are a view, valid until the next `feed`."""

    def __init__(self, decoder: DecoderSession, capacity: int, inputs: dict[str, ort.OrtValue] | None = None) -> None:
        kv, io = decoder._kv, decoder._io
        self._decoder, self._io, self.capacity, self.length = decoder, io, capacity, 0
        self.inputs = inputs
        self._binding = decoder._session.io_binding()
        # a runtime adapter's tensors: bound, because onnxruntime 1.32 ignores the active adapter
        # of RunOptions under IO binding (measured: the base model's outputs)
        for name, value in (inputs or {}).items():
            self._binding.bind_ortvalue_input(name, value)
        self._mask = np.ones((1, capacity), dtype=np.int64)
        self._logits = np.empty((1, 1, decoder.vocab_size), dtype=np.float32)
        self._shared = kv.share_buffer and io.logits_to_keep is not None
        if io.logits_to_keep:  # bound first: get_outputs() lists outputs in binding order
            self._binding.bind_cpu_input(io.logits_to_keep, np.ones(1, dtype=np.int64))
            self._binding.bind_ortvalue_output(io.logits, ort.OrtValue.ortvalue_from_numpy(self._logits))
        else:
            self._binding.bind_output(io.logits, "cpu")
        self._device = cache_device(decoder._session)
        self.tokens: list[int] = []  # what the cache holds, position by position
        self._arrays: list[np.ndarray] = []  # the host cache, where it lives on the host
        if self._shared:
            shape = (1, kv.num_kv_heads, capacity, kv.head_dim)
            if self._device == "cpu":
                self._arrays = [np.zeros(shape, dtype=decoder._kv_dtype) for _ in decoder._past_names]
                self._cache = [ort.OrtValue.ortvalue_from_numpy(array) for array in self._arrays]
            else:  # the cache lives on the accelerator: allocated there once, never copied to the host
                self._cache = [ort.OrtValue.ortvalue_from_shape_and_type(shape, decoder._kv_dtype.type, self._device, 0)
                               for _ in decoder._past_names]
            for past, present, value in zip(decoder._past_names, decoder._present_names, self._cache):
                self._binding.bind_ortvalue_input(past, value)
                self._binding.bind_ortvalue_output(present, value)
        else:
            for past, value in zip(decoder._past_names, decoder.empty_past(1)):
                self._binding.bind_cpu_input(past, value)
            for present in decoder._present_names:
                self._binding.bind_output(present, self._device)

    def feed(self, token_ids: np.ndarray) -> np.ndarray:
        """Run `token_ids` (S,) after what was fed before; logits (V,) of the last one."""
        seq = len(token_ids)
        total = self.length + seq
        if total > self.capacity:
            raise GenerationError(f"the sequence would be {total} tokens; this run holds {self.capacity}",
                                  hint="ask for fewer new tokens or a shorter prompt")
        io, binding = self._io, self._binding
        binding.bind_cpu_input(io.input_ids, np.ascontiguousarray(token_ids, dtype=np.int64).reshape(1, seq))
        binding.bind_cpu_input(io.attention_mask, self._mask[:, :total])
        if io.position_ids:
            binding.bind_cpu_input(io.position_ids, np.arange(self.length, total, dtype=np.int64)[None])
        self._decoder._session.run_with_iobinding(binding)
        self.length = total
        self.tokens.extend(int(t) for t in token_ids)
        if not self._shared:
            outputs = binding.get_outputs()
            for past, present, value in zip(self._decoder._past_names, self._decoder._present_names, outputs[1:]):
                binding.bind_ortvalue_input(past, value)
                binding.bind_output(present, self._device)  # a fresh, longer present next run
            if not io.logits_to_keep:
                binding.bind_output(io.logits, "cpu")
                return outputs[0].numpy()[0, -1]
        return self._logits[0, -1]

    @property
    def can_verify(self) -> bool:
        """Whether `verify` and `rewind` work: one preallocated cache that the attention op
        appends to (a rewound position is overwritten by the next feed) and logits per position."""
        return self._shared

    def verify(self, token_ids: np.ndarray) -> np.ndarray:
        """Like `feed`, but the logits (S, V) of every position: one run checks a whole draft."""
        seq, io, binding = len(token_ids), self._io, self._binding
        logits = np.empty((1, seq, self._decoder.vocab_size), dtype=np.float32)
        binding.bind_cpu_input(io.logits_to_keep, np.asarray([seq], dtype=np.int64))
        binding.bind_ortvalue_output(io.logits, ort.OrtValue.ortvalue_from_numpy(logits))
        try:
            self.feed(token_ids)
        finally:  # back to one position per run
            binding.bind_cpu_input(io.logits_to_keep, np.ones(1, dtype=np.int64))
            binding.bind_ortvalue_output(io.logits, ort.OrtValue.ortvalue_from_numpy(self._logits))
        return logits[0]

    def rewind(self, length: int) -> None:
        """Forget every position from `length` on (a rejected draft); the next feed writes there."""
        if not self._shared or not 0 <= length <= self.length:
            raise GenerationError(f"cannot rewind a run of {self.length} tokens to {length}",
                                  hint="rewind needs a bundle whose KV cache is one shared buffer (GroupQueryAttention)")
        self.length = length
        del self.tokens[length:]

    @property
    def reusable(self) -> bool:
        """Whether the cache can be kept for a later prompt (kv_reuse.PrefixCache): rewound, and
        moved into a larger stepper when that prompt needs more room (the cache is on the host)."""
        return self._decoder.host_shared_cache

    @property
    def cache_bytes(self) -> int:
        return sum(array.nbytes for array in self._arrays)

    def grown(self, capacity: int) -> Stepper:
        """A stepper of `capacity` positions holding this one's cache and tokens (copied)."""
        bigger = Stepper(self._decoder, capacity, self.inputs)
        for old, new in zip(self._arrays, bigger._arrays):
            new[:, :, :self.length] = old[:, :, :self.length]
        bigger.length, bigger.tokens = self.length, list(self.tokens)
        return bigger
