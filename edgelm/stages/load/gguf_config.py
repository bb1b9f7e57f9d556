"""What transformers' GGUF reader leaves out of a llama.cpp file's config, read back as llama.cpp reads it.

transformers (5.x) maps a few metadata keys per GGUF architecture and takes every other value from
its config class's defaults. Where llama.cpp's converter stored a fact that the defaults get wrong,
the model would load without an error and compute something else. Measured on tiny files written
as convert_hf_to_gguf.py writes them:
- qwen3 (and every architecture but gemma2/3, qwen3_moe, t5): `attention.key_length` is not read
  (Qwen3's default head_dim 128 is right for the released sizes; any other head_dim fails to load),
- phi3: `rope.dimension_count` (partial rotary, Phi-4-mini: 0.75), `attention.sliding_window`, and
  longrope (`rope_factors_short/long` tensors, `rope.scaling.original_context_length`,
  `rope.scaling.attn_factor`) are dropped: default rope on every position,
- gemma3: query_pre_attn_scalar stays 256 where llama.cpp uses head_dim (hidden / heads for the
  62-layer 27B), and the global layers' linear rope scaling (`rope.scaling.*`, Gemma 3 4B+) is lost,
- llama: Llama 3.1+'s rope scaling, stored as per-frequency factors (the `rope_freqs` tensor), is
  dropped: plain rope. The llama3 parameters are recovered from the factors, checked to reproduce
  every one of them, and the file is refused when they do not.
`config_overrides` returns those fields, to rebuild the config before the weights load."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from edgelm.errors import ModelLoadError

_TENSORS_READ = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")


class _File:
    """A GGUF's metadata and tensor names, read without its vocabulary or weights (transformers'
    own fast reader; gguf-py's GGUFReader parses every token, 3.5 s on a 49k vocabulary), and the
    few small F32 tensors read here, through GGUFReader, only when the file has one of them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            from transformers.integrations.gguf.reader import read_gguf_metadata
        except ImportError:  # another transformers layout: the slow, complete reader
            reader = self._full()
            self.metadata = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.")}
            self.tensor_names = tuple(t.name for t in reader.tensors)
        else:
            self.metadata, self.tensor_names = read_gguf_metadata(str(path))
        self.arch = self.metadata.get("general.architecture")
        self._tensors: dict[str, list[float]] | None = None

    def _full(self) -> Any:
        from gguf import GGUFReader

        return GGUFReader(str(self.path))

    def get(self, key: str) -> Any:
        return self.metadata.get(f"{self.arch}.{key}")

    def tensor(self, name: str) -> list[float] | None:
        if name not in self.tensor_names:
            return None
        if self._tensors is None:
            self._tensors = {t.name: [float(x) for x in t.data] for t in self._full().tensors if t.name in _TENSORS_READ}
        return self._tensors.get(name)


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, rows first as torch orders them, from the file's tensor table (no data):
    what load.weights checks the config's sizes against."""
    try:
        try:
            from transformers.integrations.gguf.reader import _mapped, _read_metadata, _read_tensor_table
        except ImportError:  # another transformers layout: gguf-py's complete (slower) reader
            from gguf import GGUFReader

            return {t.name: tuple(int(n) for n in reversed(t.shape)) for t in GGUFReader(str(path)).tensors}
        blob = _mapped(str(path))
        _, count, pos = _read_metadata(blob, str(path))
        return {name: tuple(int(n) for n in shape) for name, shape, *_ in _read_tensor_table(blob, count, pos)[0]}
    except Exception as exc:  # struct.error, ValueError, numpy's errors on a cut-off table
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"{path}: cannot read the GGUF tensor table ({reason})",
                             hint="the file is truncated or not a GGUF file; download or convert it again") from None


def config_overrides(path: Path, config: Any) -> dict[str, Any]:
    """Config fields (as a transformers config dict spells them) that the file states and
    transformers' reader did not carry over; {} when it carried everything."""
    file = _File(path)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    overrides: dict[str, Any] = {}
    key_length = file.get("attention.key_length")
    if key_length and int(key_length) != head_dim:
        head_dim = overrides["head_dim"] = int(key_length)
    freqs = file.tensor("rope_freqs.weight")
    if freqs is not None and any(abs(f - 1.0) > 1e-6 for f in freqs):
        overrides["rope_parameters"] = _llama3_rope(path, freqs, config)
    if file.arch == "phi3":
        overrides.update(_phi3(file, config, head_dim))
    elif file.arch == "gemma3":
        overrides.update(_gemma3(file, config, head_dim))
    return overrides


def _phi3(file: _File, config: Any, head_dim: int) -> dict[str, Any]:
    rope = dict(config.rope_parameters or {})
    out: dict[str, Any] = {}
    dims = file.get("rope.dimension_count")
    if dims and int(dims) != int(head_dim * rope.get("partial_rotary_factor", 1.0)):
        rope["partial_rotary_factor"] = int(dims) / head_dim
    window = file.get("attention.sliding_window")
    if window and window != getattr(config, "sliding_window", None):
        out["sliding_window"] = int(window)
    original = file.get("rope.scaling.original_context_length")
    if original:
        out["original_max_position_embeddings"] = int(original)
    long, short = file.tensor("rope_factors_long.weight"), file.tensor("rope_factors_short.weight")
    if long and short:
        rope.update(rope_type="longrope", long_factor=long, short_factor=short)
        if original:
            rope["original_max_position_embeddings"] = int(original)
        attention = file.get("rope.scaling.attn_factor")
        if attention is not None:
            rope["attention_factor"] = float(attention)
    if rope != dict(config.rope_parameters or {}):
        out["rope_parameters"] = rope
    return out


def _gemma3(file: _File, config: Any, head_dim: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    # llama.cpp (src/llama-model.cpp, LLM_ARCH_GEMMA3): 1/sqrt(n_embd / n_head) for the 27B, else 1/sqrt(head_dim)
    scalar = config.hidden_size // config.num_attention_heads if config.num_hidden_layers == 62 else head_dim
    if scalar != config.query_pre_attn_scalar:
        out["query_pre_attn_scalar"] = scalar
    if file.get("rope.scaling.type") == "linear" and file.get("rope.scaling.factor"):
        rope = {kind: dict(values) for kind, values in (config.rope_parameters or {}).items()}
        full = rope.get("full_attention", {})
        rope["full_attention"] = {**full, "rope_type": "linear", "factor": float(file.get("rope.scaling.factor"))}
        out["rope_parameters"] = rope
    return out


def _llama3_factors(base: float, dims: int, factor: float, low: float, high: float, original: float) -> list[float]:
    """convert_hf_to_gguf.py's rope_freqs for rope_type llama3 (one factor per frequency)."""
    out = []
    for i in range(0, dims, 2):
        wavelen = 2 * math.pi * base ** (i / dims)
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return out


def _llama3_rope(path: Path, factors: list[float], config: Any) -> dict[str, Any]:
    """The llama3 rope_parameters that give exactly these rope_freqs (Llama 3.x: low 1, high 4);
    the original context comes from a smoothly scaled frequency, or is 8192 (the converter's default)."""
    base = float((config.rope_parameters or {}).get("rope_theta", 10000.0))
    dims, factor, low, high = 2 * len(factors), max(factors), 1.0, 4.0
    candidates = [8192.0]
    for i, value in enumerate(factors):
        if 1.0 + 1e-4 < value < factor - 1e-4:  # in the smooth band: solve its original context
            smooth = (1 / value - 1 / factor) / (1 - 1 / factor)
            candidates.insert(0, float(round((smooth * (high - low) + low) * 2 * math.pi * base ** (2 * i / dims))))
            break
    for original in candidates:
        expected = _llama3_factors(base, dims, factor, low, high, original)
        if all(abs(a - b) <= 1e-4 * max(1.0, b) for a, b in zip(expected, factors)):
            return {**(config.rope_parameters or {}), "rope_type": "llama3", "rope_theta": base, "factor": factor,
                    "low_freq_factor": low, "high_freq_factor": high, "original_max_position_embeddings": int(original)}
    raise ModelLoadError(f"{path}: its rope_freqs tensor is not Llama 3's rope scaling, and transformers would ignore it "
                         f"(plain rope: wrong outputs)", hint="build from the model's safetensors folder instead")
