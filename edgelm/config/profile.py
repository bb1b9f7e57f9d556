"""Device profiles: where a bundle runs. One YAML file per device in device_profiles/.

Code reads capabilities from these models (quantization.mode, export.static_shapes, ...), never a
profile's name or provider string, so a new device is a new file, not new `if` statements."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from edgelm.config._yaml import load_yaml_model
from edgelm.errors import ConfigError


class Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ExportSettings(Frozen):
    opset: int = Field(18, ge=18, le=23)
    static_shapes: bool = False
    # fused: packed QKV + GroupQueryAttention (rotary and KV append inside) + packed gate/up, for
    # Llama-family decoders (others fall back to generic, said in the build facts); generic: the
    # plain dynamo export. Measured on SmolLM2 (docs/performance.md).
    graph: Literal["fused", "generic"] = "fused"
    parity_atol: float = Field(1e-3, gt=0, description="max |logits| difference ONNX fp32 vs PyTorch")
    # static_shapes (NPUs): two fixed-shape graphs, a prefill chunk of `prefill_len` tokens (the
    # last chunk of a prompt padded) and a one-token decode step, both over a KV window of
    # `kv_window` slots, which is then the bundle's context limit. The dynamic fp32 export stays
    # the quality reference.
    prefill_len: int = Field(32, ge=2, le=4096)
    kv_window: int = Field(512, ge=16, le=1 << 20)
    # Static graphs only. conv1x1: each Linear as a 1x1 Conv, whose weights QNN's HTP quantizes per
    # output channel (its MatMul weights only per tensor): ratio 1.077 -> 1.019 on SmolLM2.
    projections: Literal["matmul", "conv1x1"] = "matmul"

    @model_validator(mode="after")
    def _chunk_fits_window(self) -> "ExportSettings":
        if self.prefill_len >= self.kv_window:
            raise ValueError(f"prefill_len {self.prefill_len} must be smaller than kv_window {self.kv_window}")
        return self


class FusionSettings(Frozen):
    enabled: bool = True
    required: tuple[str, ...] = ()


class NoQuantization(Frozen):
    mode: Literal["none"]


class StaticQDQ(Frozen):
    mode: Literal["static-qdq"]
    activation_dtype: Literal["uint8", "uint16"] = "uint8"
    weight_dtype: Literal["int8", "uint8"] = "int8"
    per_channel: bool = True
    # 7-bit weights: u8 x s8 GEMMs on AVX2 without VNNI sum pairs in int16 and saturate on
    # full-range int8 weights (measured here: wrong results, perplexity x20000); 7 bits cannot.
    reduce_range: bool = False
    calibration_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    # SmoothQuant migration strength (0: none, 1: all into the weights); null turns it off.
    smoothquant_alpha: float | None = Field(None, ge=0.0, le=1.0)
    # "auto": keep the fewest weight MatMuls in fp32 that meet the quality gates (needs a gate).
    mixed_precision: Literal["off", "auto"] = "off"
    # Weight MatMuls kept in float, by PyTorch module path substring (e.g. "layers.0.", "mlp.").
    keep_float: tuple[str, ...] = ()
    # weight-matmuls: QDQ on the inputs of weight MatMuls only, the rest float (CPUs: measured best);
    # all: QDQ on every op with onnxruntime's QNN rules (get_qnn_qdq_config), what an NPU runs.
    ops: Literal["weight-matmuls", "all"] = "weight-matmuls"
    # hadamard: rotate the residual stream, value heads and down inputs before export (QuaRot-style,
    # edgelm/stages/compress/rotate.py), so outliers spread over every channel; fp32 function unchanged.
    rotation: Literal["none", "hadamard"] = "none"

    @model_validator(mode="after")
    def _rotation_replaces_smoothing(self) -> "StaticQDQ":
        if self.rotation != "none" and self.smoothquant_alpha is not None:
            raise ValueError("rotation: hadamard replaces SmoothQuant (its scales cannot fold through the online "
                             "rotation); set smoothquant_alpha: null")
        return self


class WeightOnly(Frozen):
    """Weight-only block quantization (onnxruntime MatMulNBits): no calibration, float activations
    (int8 per block at run time at accuracy_level 4)."""

    mode: Literal["weight-only"]
    bits: Literal[4, 8] = 4
    block_size: Literal[16, 32, 64, 128, 256] = 32
    symmetric: bool = False
    # rtn: round to nearest (onnxruntime's C++ block quantizer); hqq: half-quadratic scale/zero search;
    # k_quant: llama.cpp-style k-quant scale search. All three need no calibration data.
    algorithm: Literal["rtn", "hqq", "k_quant"] = "rtn"
    # MatMulNBits compute type: 0 = fp32 after dequantizing (measured 8x slower for 8-bit weights),
    # 4 = int8 activations quantized per block at run time.
    accuracy_level: Literal[0, 1, 2, 3, 4] = 4
    lm_head: Literal["float", "quantized"] = "quantized"
    embeddings: Literal["float", "int4"] = "float"   # int4: GatherBlockQuantized
    # AWQ: scale weight columns by activation magnitude (searched per input on calibration data)
    # before export, so the channels that matter get finer steps. The fp32 function is unchanged.
    activation_aware: bool = False
    keep_float: tuple[str, ...] = ()
    # In a 4-bit build, MatMuls kept at 8 bits, by module path substring (e.g. "mlp.", "lm_head"):
    # llama.cpp's Q4_K_M does the same with 6 bits for its most sensitive tensors.
    keep_int8: tuple[str, ...] = ()
    # hadamard: rotate before export (edgelm/stages/compress/rotate.py), so that the int8 activation
    # blocks of accuracy level 4 and the weight blocks hold no outlier; the fp32 function is unchanged.
    rotation: Literal["none", "hadamard"] = "none"

    @model_validator(mode="after")
    def _symmetric_needs_rtn(self) -> "WeightOnly":
        if self.symmetric and self.algorithm != "rtn":
            raise ValueError(f"symmetric: true needs algorithm rtn ({self.algorithm} quantizes asymmetrically)")
        if self.keep_int8 and self.bits != 4:
            raise ValueError("keep_int8 needs bits: 4 (every MatMul is already 8-bit)")
        if self.rotation != "none" and self.activation_aware:
            raise ValueError("rotation: hadamard and activation_aware: true do not combine (AWQ's scales cannot fold "
                             "through the online rotation); choose one")
        return self


class Float16(Frozen):
    """fp16 weights and activations (onnxruntime.transformers.float16), for GPUs. Ops that
    overflow or lose too much in fp16 stay fp32 with casts around them (`keep_fp32_ops`); the KV
    cache is fp16; input ids, mask and logits keep their types at the graph's edge."""

    mode: Literal["float16"]
    keep_fp32_ops: tuple[str, ...] = ()


Quantization = Annotated[Union[NoQuantization, StaticQDQ, WeightOnly, Float16], Field(discriminator="mode")]


class SessionSettings(Frozen):
    graph_optimization_level: Literal["disable", "basic", "extended", "all"] = "all"
    intra_op_threads: int = Field(0, ge=0)


class GenerationSettings(Frozen):
    """Generation defaults the bundle's manifest carries for the runtime. prompt_lookup: speculative
    greedy decoding from prompt-lookup drafts of up to this many tokens (0 = off); on only where the
    graph's logits do not depend on how many positions a run computes, so that it is exact
    (docs/decoding.md: int8 activation quantization at run time turns 1-ulp differences into
    different near-tie picks)."""
    prompt_lookup: int = Field(0, ge=0, le=64)


class QualityGates(Frozen):
    """Default gates of decoder builds for this device; a recipe's quality.* values take precedence."""

    max_perplexity_ratio: float | None = Field(None, gt=1.0)
    min_top1_agreement: float | None = Field(None, ge=0.0, le=1.0)
    max_kl_divergence: float | None = Field(None, gt=0.0)
    min_chat_identical: float | None = Field(None, ge=0.0, le=1.0)
    min_chat_prefix: float | None = Field(None, ge=0.0, le=1.0)
    max_chat_kl: float | None = Field(None, gt=0.0)


class EncoderSettings(Frozen):
    """How this device builds encoder bundles (`edgelm build --task ...`). `quantization` names
    an encoder scheme of edgelm/quant/encoder.py, chosen per device by measurement
    (docs/encoders.md); `required_fusions` are counted after the fuse stage like the decoders'."""

    quantization: Literal["none", "dynamic-int8", "static-int8", "weight-only-int4", "float16", "qnn-qdq"]
    required_fusions: tuple[str, ...] = ("MultiHeadAttention", "SkipLayerNormalization")
    # NPUs: one graph of batch 1 and exactly this many tokens (inputs padded to it), plain ops only
    # (attention as MatMul/Softmax); the dynamic fp32 export stays the quality reference
    static_seq_len: int | None = Field(None, ge=8, le=4096)
    # int4: the token embedding as 4-bit GatherBlockQuantized blocks of 32. It is most of a small
    # encoder (MiniLM: 47 of 59 MB at int8); measured on MiniLM int8, 500 BBC titles -> articles:
    # 59.5 -> 19 MB, cosine 0.9938 -> 0.9925, retrieval agreement 0.960 -> 0.955
    embeddings: Literal["float", "int4"] = "float"
    # default gates of encoder builds, each against the fp32 model on held-out text (a recipe's
    # quality.* values take precedence): mean cosine of the embeddings and retrieval top-1
    # agreement, titles -> articles (feature-extraction), label agreement (sequence classification), entity F1 of the
    # bundle's entities against fp32's (token classification)
    min_mean_cosine: float | None = Field(None, ge=0.0, le=1.0)
    min_retrieval_agreement: float | None = Field(None, ge=0.0, le=1.0)
    min_label_agreement: float | None = Field(None, ge=0.0, le=1.0)
    min_entity_f1: float | None = Field(None, ge=0.0, le=1.0)


class DeviceProfile(Frozen):
    name: str
    description: str
    provider: str
    export: ExportSettings = ExportSettings()
    fusions: FusionSettings = FusionSettings()
    quantization: Quantization
    session: SessionSettings = SessionSettings()
    generation: GenerationSettings = GenerationSettings()
    quality: QualityGates = QualityGates()
    encoder: EncoderSettings | None = None  # None: this device builds decoders only
    # The ops the device runs (op types; "domain:Op" outside the ONNX domain). Non-empty: the build
    # fails naming any op of the final graph that is not listed.
    allowed_ops: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _supported_combination(self) -> "DeviceProfile":
        """Combinations the pipeline cannot build, refused here with the fields named."""
        export, quantization = self.export, self.quantization
        if export.static_shapes:
            if export.opset < 23:
                raise ValueError(f"export.opset: static graphs need opset 23 for RMSNormalization (got {export.opset}); "
                                 "a decomposed norm loses the 16-bit activations (perplexity x2600 on SmolLM2)")
            if self.fusions.enabled:
                raise ValueError("fusions.enabled: static graphs are not fused by onnxruntime's optimizer "
                                 "(its fused ops take dynamic shapes); set fusions.enabled: false")
        elif export.projections != "matmul":
            raise ValueError("export.projections: conv1x1 needs export.static_shapes: true")
        from edgelm.quant import scheme_for  # the scheme knows which exports it can quantize

        refusal = scheme_for(quantization).export_refusal(export, quantization)
        if refusal:
            raise ValueError(refusal)
        return self


def _builtin_dir() -> Path:
    return Path(str(resources.files("edgelm.device_profiles")))


def list_profiles() -> list[DeviceProfile]:
    return [load_profile(p) for p in sorted(_builtin_dir().glob("*.yaml"))]


def load_profile(name_or_path: str | Path) -> DeviceProfile:
    """A built-in profile by name (`cpu-int8`) or any profile YAML file by path."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = _builtin_dir() / f"{name_or_path}.yaml"
        if not path.is_file():
            known = ", ".join(p.stem for p in sorted(_builtin_dir().glob("*.yaml")))
            raise ConfigError(f"unknown profile {str(name_or_path)!r}", hint=f"use one of: {known}, or a path to a .yaml profile")
    elif not path.is_file():
        raise ConfigError(f"{path}: profile file not found", hint="check the path, or use a built-in name (edgelm profiles)")
    return load_yaml_model(path, DeviceProfile, "profile")
