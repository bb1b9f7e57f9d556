"""Encoder attention as one onnxruntime MultiHeadAttention node per layer.

transformers runs every encoder family's attention through one interface (AttentionInterface,
keyed by `config._attn_implementation`), and builds the padding mask through another
(AttentionMaskInterface). edgelm registers `edgelm_mha` in both: the mask stays the 2D padding
mask, and attention is the custom op `edgelm::mha`, which torch.onnx translates to
`com.microsoft::MultiHeadAttention` with a key_padding_mask. Why not onnxruntime's BERT fusion
alone: on the graphs torch.onnx.export(dynamo=True) writes from transformers 5 it fuses no
Attention on MiniLM (eager or sdpa), and the TorchScript exporter's graph, which it does fuse,
is wrong there (max diff 1.45 against PyTorch). The rest (SkipLayerNormalization, BiasGelu, ...)
is still left to the optimizer (edgelm/stages/optimize.py). Fixed-shape NPU graphs take
`edgelm_plain` instead: the same attention in plain ops, with a bounded mask."""

from __future__ import annotations

from typing import Any

IMPLEMENTATION = "edgelm_mha"
STATIC_IMPLEMENTATION = "edgelm_plain"  # fixed-shape NPU graphs: MatMul, Softmax and a bounded additive mask
MASK_VALUE = -100.0  # exp(-100) is 0 in fp32, and a small range survives 16-bit quantization (finfo.min does not)
_SCHEMA = "(Tensor query, Tensor key, Tensor value, Tensor key_padding_mask, int num_heads, float scale) -> Tensor"


def register() -> Any:
    """Register `edgelm_mha` with transformers and the custom op with torch (once); returns the op."""
    import torch
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    if not hasattr(torch.ops.edgelm, "mha"):
        @torch.library.custom_op("edgelm::mha", mutates_args=(), schema=_SCHEMA)
        def mha(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_padding_mask: torch.Tensor,
                num_heads: int, scale: float) -> torch.Tensor:
            """MultiHeadAttention's math: (batch, seq, heads * head_dim) each; keys where
            key_padding_mask is 0 get no weight."""
            batch, seq, width = query.shape
            heads = lambda x: x.view(batch, -1, num_heads, width // num_heads).transpose(1, 2)  # noqa: E731
            scores = heads(query) @ heads(key).transpose(2, 3) * scale
            scores = scores.masked_fill(key_padding_mask[:, None, None, :] == 0, torch.finfo(scores.dtype).min)
            out = torch.softmax(scores, dim=-1) @ heads(value)
            return out.transpose(1, 2).reshape(batch, seq, width)

        @mha.register_fake
        def _(query, key, value, key_padding_mask, num_heads, scale):
            return query.new_empty(query.shape)

    AttentionInterface.register(IMPLEMENTATION, _attention)
    AttentionMaskInterface.register(IMPLEMENTATION, _padding_mask)
    AttentionInterface.register(STATIC_IMPLEMENTATION, _plain_attention)
    AttentionMaskInterface.register(STATIC_IMPLEMENTATION, _padding_mask)
    return torch.ops.edgelm.mha.default


def _padding_mask(batch_size: int, q_length: int, kv_length: int, attention_mask: Any = None, **kwargs: Any) -> Any:
    """The 2D padding mask (batch, kv), kept as it is; all ones when the caller passed none."""
    import torch

    if attention_mask is None:
        return torch.ones(batch_size, kv_length, dtype=torch.bool)
    return attention_mask


def _attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, scaling: float | None = None,
               dropout: float = 0.0, **kwargs: Any) -> tuple[Any, None]:
    """AttentionInterface's contract: q/k/v (batch, heads, seq, head_dim) in, (batch, seq, heads,
    head_dim) out."""
    import torch

    batch, heads, seq, head_dim = query.shape
    flat = lambda x: x.transpose(1, 2).reshape(batch, x.shape[2], heads * head_dim)  # noqa: E731
    scale = float(scaling if scaling is not None else head_dim ** -0.5)
    out = torch.ops.edgelm.mha(flat(query), flat(key), flat(value), attention_mask.to(torch.int32), heads, scale)
    return out.view(batch, seq, heads, head_dim), None


def _plain_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, scaling: float | None = None,
                     dropout: float = 0.0, **kwargs: Any) -> tuple[Any, None]:
    """The same attention in plain ops, padding masked by adding MASK_VALUE (a QDQ graph
    quantizes the scores with the mask in them: a mask of finfo.min leaves the scores no steps)."""
    import torch

    scale = float(scaling if scaling is not None else query.shape[-1] ** -0.5)
    bias = (1.0 - attention_mask[:, None, None, :].to(query.dtype)) * MASK_VALUE
    probs = torch.softmax(query @ key.transpose(2, 3) * scale + bias, dim=-1)
    return (probs @ value).transpose(1, 2), None


def _schema() -> Any:
    from onnx.defs import OpSchema

    param, optional = OpSchema.FormalParameter, OpSchema.FormalParameterOption.Optional
    inputs = [param("query", "T"), param("key", "T", param_option=optional), param("value", "T", param_option=optional),
              param("bias", "T", param_option=optional), param("key_padding_mask", "M", param_option=optional)]
    return OpSchema("MultiHeadAttention", "com.microsoft", 1, inputs=inputs, outputs=[param("output", "T")],
                    type_constraints=[("T", ["tensor(float)", "tensor(float16)"], ""), ("M", ["tensor(int32)"], "")],
                    attributes=[OpSchema.Attribute("num_heads", OpSchema.AttrType.INT, ""),
                                OpSchema.Attribute("scale", OpSchema.AttrType.FLOAT, "")])


def translation_table() -> dict[Any, Any]:
    """torch.onnx custom_translation_table entry: edgelm::mha -> com.microsoft::MultiHeadAttention."""
    from onnxscript import values

    multi_head_attention = values.Op(values.Opset("com.microsoft", 1), "MultiHeadAttention", _schema())

    def mha_to_onnx(query, key, value, key_padding_mask, num_heads: int, scale: float):
        return multi_head_attention(query, key, value, None, key_padding_mask, num_heads=num_heads, scale=scale)

    return {register(): mha_to_onnx}
