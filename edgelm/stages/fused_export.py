"""Export a Llama-family decoder straight into the kernels onnxruntime runs fastest.

Why hand-written: after a generic dynamo export, onnxruntime's optimizer fuses only the norms (no
attention pattern of that graph matches) and nothing packs the projections. Decode on this
model class is bound by per-kernel overhead, not memory (30 small layers), so the graph should
have what onnxruntime-genai's builder emits: one packed QKV MatMul feeding GroupQueryAttention
(rotary inside, KV cache appended in place), one packed gate/up MatMul, and norms the optimizer
then fuses. The genai builder itself reads only checkpoints from disk and writes its own I/O
conventions; edgelm needs the in-memory model (adapters merged, pruned, smoothed) and its own.

So the decoder is re-expressed here with the model's own modules and weights, and attention
is one custom torch op translated to com.microsoft::GroupQueryAttention at export. The export
stage checks parity with the Hugging Face model every build, so a mistake here cannot ship."""

from __future__ import annotations

from typing import Any

# packed module -> the original module with the same input (where activation statistics live)
PACKED_INPUTS = {"qkv_proj": "q_proj", "gate_up_proj": "gate_proj"}
_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm")
# Spelled out: this module uses postponed annotations, which torch cannot read for a schema.
_GQA_SCHEMA = ("(Tensor qkv, Tensor past_key, Tensor past_value, Tensor seqlens_k, Tensor total_length, "
               "Tensor cos, Tensor sin, int num_heads, int kv_num_heads) -> (Tensor, Tensor, Tensor)")


def fused_export_refusal(model: Any) -> str | None:
    """Why this model cannot take the fused route (None: it can). Checked on the modules, not the
    name, so a pruned or unusual checkpoint falls back to the generic export instead of failing."""
    config = model.config
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        return "not a Llama-style decoder (model.layers + model.rotary_emb)"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act {config.hidden_act} (GroupQueryAttention route expects a SiLU MLP)"
    if getattr(config, "sliding_window", None) and config.sliding_window < getattr(config, "max_position_embeddings", 0):
        return "sliding-window attention"
    for layer in inner.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if not all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
            return "attention without q/k/v/o projections"
        if not all(hasattr(mlp, p) for p in ("gate_proj", "up_proj", "down_proj")):
            return "MLP without gate/up/down projections"
        if any(hasattr(attn, extra) for extra in ("q_norm", "k_norm")):
            return "q/k norms inside attention"
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            if type(norm).__name__ not in _NORMS:
                return f"norm {type(norm).__name__}"
    return None


def _register_ops() -> Any:
    """The custom op `edgelm::gqa` (reference math for tracing) and its ONNX translation."""
    import torch

    if hasattr(torch.ops.edgelm, "gqa"):
        return torch.ops.edgelm.gqa.default

    @torch.library.custom_op("edgelm::gqa", mutates_args=(), schema=_GQA_SCHEMA)
    def gqa(qkv: torch.Tensor, past_key: torch.Tensor, past_value: torch.Tensor, seqlens_k: torch.Tensor,
            total_length: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
            kv_num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What GroupQueryAttention computes for batch rows without padding: rotary on q and k at
        positions past..past+S, the new k/v appended to the cache, causal softmax attention."""
        batch, seq, _ = qkv.shape
        head_dim = past_key.shape[-1]
        q, k, v = qkv.split([num_heads * head_dim, kv_num_heads * head_dim, kv_num_heads * head_dim], dim=-1)
        q = q.view(batch, seq, num_heads, head_dim).transpose(1, 2)
        k = k.view(batch, seq, kv_num_heads, head_dim).transpose(1, 2)
        v = v.view(batch, seq, kv_num_heads, head_dim).transpose(1, 2)
        past = past_key.shape[2]
        positions = torch.arange(past, past + seq)
        q, k = _rotate(q, cos[positions], sin[positions]), _rotate(k, cos[positions], sin[positions])
        key, value = torch.cat([past_key, k], dim=2), torch.cat([past_value, v], dim=2)
        groups = num_heads // kv_num_heads
        out = torch.nn.functional.scaled_dot_product_attention(
            q, key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1),
            attn_mask=torch.ones(seq, past + seq, dtype=torch.bool).tril(past))
        return out.transpose(1, 2).reshape(batch, seq, num_heads * head_dim), key, value

    @gqa.register_fake
    def _(qkv, past_key, past_value, seqlens_k, total_length, cos, sin, num_heads, kv_num_heads):
        batch, seq, _ = qkv.shape
        head_dim = past_key.shape[-1]
        new_shape = (batch, kv_num_heads, past_key.shape[2] + seq, head_dim)
        return qkv.new_empty(batch, seq, num_heads * head_dim), past_key.new_empty(new_shape), past_value.new_empty(new_shape)

    return torch.ops.edgelm.gqa.default


def _rotate(x: Any, cos: Any, sin: Any) -> Any:
    import torch

    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _gqa_schema() -> Any:
    """onnx has no schema for onnxruntime's contrib ops; the exporter needs one to wire the node."""
    from onnx.defs import OpSchema

    tensor, ints = "T", "M"
    param = OpSchema.FormalParameter
    optional = OpSchema.FormalParameterOption.Optional
    inputs = [param("query", tensor), param("key", tensor, param_option=optional),
              param("value", tensor, param_option=optional), param("past_key", tensor, param_option=optional),
              param("past_value", tensor, param_option=optional), param("seqlens_k", ints),
              param("total_sequence_length", ints), param("cos_cache", tensor, param_option=optional),
              param("sin_cache", tensor, param_option=optional)]
    outputs = [param("output", tensor), param("present_key", tensor), param("present_value", tensor)]
    attributes = [OpSchema.Attribute(name, OpSchema.AttrType.INT, "")
                  for name in ("num_heads", "kv_num_heads", "do_rotary", "rotary_interleaved")]
    return OpSchema("GroupQueryAttention", "com.microsoft", 1, inputs=inputs, outputs=outputs,
                    type_constraints=[(tensor, ["tensor(float)", "tensor(float16)"], ""), (ints, ["tensor(int32)"], "")],
                    attributes=attributes)


def translation_table() -> dict[Any, Any]:
    """torch.onnx custom_translation_table entry: edgelm::gqa -> com.microsoft::GroupQueryAttention."""
    from onnxscript import values

    group_query_attention = values.Op(values.Opset("com.microsoft", 1), "GroupQueryAttention", _gqa_schema())

    def gqa_to_onnx(qkv, past_key, past_value, seqlens_k, total_length, cos, sin, num_heads: int, kv_num_heads: int):
        return group_query_attention(qkv, None, None, past_key, past_value, seqlens_k, total_length, cos, sin,
                                     num_heads=num_heads, kv_num_heads=kv_num_heads, do_rotary=1, rotary_interleaved=0)

    return {_register_ops(): gqa_to_onnx}


def fused_decoder(model: Any, max_positions: int) -> Any:
    """(input_ids, attention_mask, *past) -> (logits, *present) built from `model`'s own weights.

    q/k/v and gate/up are packed into one Linear each (named qkv_proj / gate_up_proj, so
    quantization rules keyed on module paths still find them); the rotary tables are precomputed
    by the model's own rotary module, so every rope variant it implements comes out right."""
    import torch

    gqa = _register_ops()
    config, inner = model.config, model.model
    num_heads, kv_heads = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads

    def packed(*linears: torch.nn.Linear) -> torch.nn.Linear:
        bias = [lin.bias for lin in linears]
        out = torch.nn.Linear(linears[0].in_features, sum(lin.out_features for lin in linears),
                              bias=all(b is not None for b in bias))
        if any(b is not None for b in bias) and not all(b is not None for b in bias):
            raise ValueError("q/k/v projections mix biased and unbiased layers")
        with torch.no_grad():
            out.weight.copy_(torch.cat([lin.weight for lin in linears]))
            if out.bias is not None:
                out.bias.copy_(torch.cat(bias))
        return out

    class Attention(torch.nn.Module):
        def __init__(self, attn: Any) -> None:
            super().__init__()
            self.qkv_proj = packed(attn.q_proj, attn.k_proj, attn.v_proj)
            self.o_proj = attn.o_proj

    class MLP(torch.nn.Module):
        def __init__(self, mlp: Any) -> None:
            super().__init__()
            self.gate_up_proj = packed(mlp.gate_proj, mlp.up_proj)
            self.down_proj = mlp.down_proj
            self.act_fn = mlp.act_fn
            self.intermediate = mlp.gate_proj.out_features

        def forward(self, x):
            gate, up = self.gate_up_proj(x).split([self.intermediate, self.intermediate], dim=-1)
            return self.down_proj(self.act_fn(gate) * up)

    class Layer(torch.nn.Module):
        def __init__(self, layer: Any) -> None:
            super().__init__()
            self.input_layernorm = layer.input_layernorm
            self.self_attn = Attention(layer.self_attn)
            self.post_attention_layernorm = layer.post_attention_layernorm
            self.mlp = MLP(layer.mlp)

    class Decoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed_tokens = inner.embed_tokens
            self.layers = torch.nn.ModuleList(Layer(layer) for layer in inner.layers)
            self.norm = inner.norm
            self.lm_head = model.lm_head
            with torch.no_grad():
                positions = torch.arange(max_positions)[None]
                cos, sin = inner.rotary_emb(self.embed_tokens.weight[:1], positions)
            self.register_buffer("cos", cos[0, :, : head_dim // 2].float().contiguous())
            self.register_buffer("sin", sin[0, :, : head_dim // 2].float().contiguous())

        def forward(self, input_ids, attention_mask, *past):
            seqlens_k = (attention_mask.sum(dim=1) - 1).to(torch.int32)
            total = torch.tensor(attention_mask.shape[1], dtype=torch.int32)
            hidden = self.embed_tokens(input_ids)
            present = []
            for i, layer in enumerate(self.layers):
                attn = layer.self_attn
                out, key, value = gqa(attn.qkv_proj(layer.input_layernorm(hidden)), past[2 * i], past[2 * i + 1],
                                      seqlens_k, total, self.cos, self.sin, num_heads, kv_heads)
                hidden = hidden + attn.o_proj(out)
                hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
                present += [key, value]
            return (self.lm_head(self.norm(hidden)), *present)

    return Decoder().eval()
