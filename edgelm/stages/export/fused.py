"""Export a decoder straight into the kernels onnxruntime runs fastest, for every family the arch
describes (edgelm.arch).

Why hand-written: after a generic dynamo export, onnxruntime's optimizer fuses only the norms (no
attention pattern of that graph matches) and nothing packs the projections. Decode on this
model class is bound by per-kernel overhead, not memory (30 small layers), so the graph should
have what onnxruntime-genai's builder emits: one packed QKV MatMul feeding GroupQueryAttention
(rotary inside, KV cache appended in place), one packed gate/up MatMul, and norms the optimizer
then fuses. The genai builder itself reads only checkpoints from disk and writes its own I/O
conventions; edgelm needs the in-memory model (adapters merged, pruned, smoothed) and its own.

So the decoder is re-expressed here from what the arch says (role weights, norms, per-layer
attention facts: rotary table or none, partial rotary, window, scale, soft-cap, q/k norms) with
the model's own modules and weights, and attention is one custom torch op translated to
com.microsoft::GroupQueryAttention at export. What GroupQueryAttention computes was measured
against a numpy reference (onnxruntime 1.32, CPU): local_window_size = W keeps the query and the
W - 1 keys before it, exactly transformers' sliding_window = W; softcap applies after `scale`
(cap * tanh(scale * qk / cap)), as Gemma does; its rotary takes a cos cache of any width that is a
multiple of 8 and at most head_dim / 2 (rotary_dim = 2 * width, the rest of each head passes
through: partial rotary), else it fails at run time, so rotary_dim % 16 != 0 is applied in the
graph before the op (do_rotary 0). The export stage checks parity with the Hugging Face model
every build, so a mistake here cannot ship."""

from __future__ import annotations

from typing import Any

from edgelm.arch.base import ATTENTION_INPUT, MLP_INPUT, DecoderArch

# Spelled out: this module uses postponed annotations, which torch cannot read for a schema.
_GQA_SCHEMA = ("(Tensor query, Tensor? key, Tensor? value, Tensor past_key, Tensor past_value, Tensor seqlens_k, "
               "Tensor total_length, Tensor? cos, Tensor? sin, int num_heads, int kv_num_heads, float scale, "
               "float softcap, int local_window_size, int do_rotary) -> (Tensor, Tensor, Tensor)")


def packed_inputs(arch: DecoderArch) -> dict[str, str]:
    """{leaf name of a Linear the fused graph packs: leaf name of the first Linear it stands for},
    e.g. the packed q/k/v Linear -> the q Linear, whose input (statistics) it shares."""
    return {arch.packed_path(roles).rsplit(".", 1)[-1]: arch.projections[roles[0]].rsplit(".", 1)[-1]
            for roles in (ATTENTION_INPUT, MLP_INPUT)}


# packed module -> the original module with the same input (where activation statistics live)
PACKED_INPUTS = packed_inputs(DecoderArch())


def rotary_inside(attention: Any) -> bool:
    """Whether GroupQueryAttention applies this layer's rotary itself (see the module docstring)."""
    return attention.rotary is not None and attention.rotary_dim % 16 == 0 and attention.rotary_dim <= attention.head_dim


def fused_export_refusal(model: Any) -> str | None:
    """Why this model cannot take the fused route (None: it can): the arch's own reason, or what
    GroupQueryAttention cannot express. The build then takes the generic route and records this."""
    from edgelm.arch import for_model
    from edgelm.errors import ModelLoadError

    try:
        arch = for_model(model)
    except ModelLoadError as exc:
        return str(exc)
    reason = arch.fused_refusal(model)
    if reason:
        return reason
    config = model.config
    if getattr(config, "use_bidirectional_attention", False):
        return "bidirectional attention (GroupQueryAttention is causal)"
    for index, layer in enumerate(arch.layers(model)):
        attention = arch.attention(config, index)
        if attention.heads % attention.kv_heads:
            return f"layer {index}: {attention.heads} query heads over {attention.kv_heads} KV heads"
        widths = {role: arch.role(layer, role, config).weight.shape[0] for role in ATTENTION_INPUT}
        expected = {"q": attention.heads * attention.head_dim, "k": attention.kv_heads * attention.head_dim,
                    "v": attention.kv_heads * attention.head_dim}
        if widths != expected:
            return f"layer {index}: q/k/v widths {widths} do not match the config's heads ({expected})"
        if attention.rotary is not None and (attention.rotary_dim % 2 or attention.rotary_dim > attention.head_dim):
            return f"layer {index}: rotary_dim {attention.rotary_dim} for head_dim {attention.head_dim}"
        for role in ("o", "down"):
            weight = arch.role(layer, role, config)
            if weight.rows != slice(0, weight.linear.out_features):
                return f"layer {index}: the {role} projection shares its Linear with another role"
    return None


def _register_ops() -> Any:
    """The custom op `edgelm::gqa` (reference math for tracing) and its ONNX translation."""
    import torch

    if hasattr(torch.ops.edgelm, "gqa"):
        return torch.ops.edgelm.gqa.default

    @torch.library.custom_op("edgelm::gqa", mutates_args=(), schema=_GQA_SCHEMA)
    def gqa(query: torch.Tensor, key: torch.Tensor | None, value: torch.Tensor | None, past_key: torch.Tensor,
            past_value: torch.Tensor, seqlens_k: torch.Tensor, total_length: torch.Tensor, cos: torch.Tensor | None,
            sin: torch.Tensor | None, num_heads: int, kv_num_heads: int, scale: float, softcap: float,
            local_window_size: int, do_rotary: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What GroupQueryAttention computes for batch rows without padding (past not shared with
        present): q/k/v packed in `query` when key is None; rotary (do_rotary) over the first
        2 * cos.shape[1] dims of q and k at positions past..past+S; the new k/v appended to the
        cache; scores * scale, soft-capped (softcap > 0); causal, within the window
        (local_window_size > 0: the query and the window - 1 keys before it)."""
        batch, seq, _ = query.shape
        head_dim = past_key.shape[-1]
        if key is None:
            query, key, value = query.split([num_heads * head_dim, kv_num_heads * head_dim, kv_num_heads * head_dim], -1)
        q = query.view(batch, seq, num_heads, head_dim).transpose(1, 2)
        k = key.view(batch, seq, kv_num_heads, head_dim).transpose(1, 2)
        v = value.view(batch, seq, kv_num_heads, head_dim).transpose(1, 2)
        past = past_key.shape[2]
        positions = torch.arange(past, past + seq)
        if do_rotary:
            q, k = rotate(q, cos[positions], sin[positions]), rotate(k, cos[positions], sin[positions])
        key, value = torch.cat([past_key, k], dim=2), torch.cat([past_value, v], dim=2)
        groups = num_heads // kv_num_heads
        scores = q @ key.repeat_interleave(groups, 1).transpose(2, 3) * scale
        if softcap > 0:
            scores = torch.tanh(scores / softcap) * softcap
        keys = torch.arange(past + seq)[None]
        visible = keys <= positions[:, None]
        if local_window_size > 0:
            visible &= keys > positions[:, None] - local_window_size
        probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
        out = probs @ value.repeat_interleave(groups, 1)
        return out.transpose(1, 2).reshape(batch, seq, num_heads * head_dim), key, value

    @gqa.register_fake
    def _(query, key, value, past_key, past_value, seqlens_k, total_length, cos, sin, num_heads, kv_num_heads,
          scale, softcap, local_window_size, do_rotary):
        batch, seq, _ = query.shape
        head_dim = past_key.shape[-1]
        new_shape = (batch, kv_num_heads, past_key.shape[2] + seq, head_dim)
        return (query.new_empty(batch, seq, num_heads * head_dim), past_key.new_empty(new_shape),
                past_value.new_empty(new_shape))

    return torch.ops.edgelm.gqa.default


def rotate(x: Any, cos: Any, sin: Any) -> Any:
    """Rotate-half rotary over the first 2 * cos.shape[-1] dims of x (..., head_dim); the rest of
    each head passes through (partial rotary). cos/sin broadcast against x[..., :width]."""
    import torch

    half = cos.shape[-1]
    x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


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
                  for name in ("num_heads", "kv_num_heads", "do_rotary", "rotary_interleaved", "local_window_size")]
    attributes += [OpSchema.Attribute(name, OpSchema.AttrType.FLOAT, "") for name in ("scale", "softcap")]
    return OpSchema("GroupQueryAttention", "com.microsoft", 1, inputs=inputs, outputs=outputs,
                    type_constraints=[(tensor, ["tensor(float)", "tensor(float16)"], ""), (ints, ["tensor(int32)"], "")],
                    attributes=attributes)


def translation_table() -> dict[Any, Any]:
    """torch.onnx custom_translation_table entry: edgelm::gqa -> com.microsoft::GroupQueryAttention."""
    from onnxscript import values

    group_query_attention = values.Op(values.Opset("com.microsoft", 1), "GroupQueryAttention", _gqa_schema())

    def gqa_to_onnx(query, key, value, past_key, past_value, seqlens_k, total_length, cos, sin, num_heads: int,
                    kv_num_heads: int, scale: float, softcap: float, local_window_size: int, do_rotary: int):
        return group_query_attention(query, key, value, past_key, past_value, seqlens_k, total_length, cos, sin,
                                     num_heads=num_heads, kv_num_heads=kv_num_heads, scale=scale, softcap=softcap,
                                     local_window_size=local_window_size, do_rotary=do_rotary, rotary_interleaved=0)

    return {_register_ops(): gqa_to_onnx}


def _place(root: Any, path: str, module: Any) -> None:
    """Register `module` under the dotted `path` of `root`, making plain containers on the way, so
    the exported nodes carry that module path (quantization rules and statistics key on it)."""
    import torch

    *parents, leaf = path.split(".")
    for part in parents:
        if not hasattr(root, part):
            root.add_module(part, torch.nn.Module())
        root = getattr(root, part)
    root.add_module(leaf, module)


def _get(root: Any, path: str) -> Any:
    for part in path.split("."):
        root = getattr(root, part)
    return root


def _packed(weights: list[Any]) -> Any:
    """One Linear computing the role weights' rows side by side: the family's own Linear when the
    roles already are its rows in order (Phi-3), else a new one (a missing bias is zeros)."""
    import torch

    linear = weights[0].linear
    if all(w.linear is linear for w in weights) and [(w.rows.start, w.rows.stop) for w in weights] == \
            [(sum(x.weight.shape[0] for x in weights[:i]), sum(x.weight.shape[0] for x in weights[:i + 1]))
             for i in range(len(weights))] and weights[-1].rows.stop == linear.out_features:
        return linear
    with torch.no_grad():
        weight = torch.cat([w.weight for w in weights])
        biased = any(w.bias is not None for w in weights)
        out = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=biased, dtype=weight.dtype)
        out.weight.copy_(weight)
        if biased:
            out.bias.copy_(torch.cat([w.bias if w.bias is not None else weight.new_zeros(w.weight.shape[0])
                                      for w in weights]))
    return out


def fused_decoder(model: Any, max_positions: int) -> Any:
    """(input_ids, attention_mask, *past) -> (logits, *present) built from `model`'s own weights.

    q/k/v and gate/up are packed into one Linear each, placed at arch.packed_path (and every other
    module at its path in the model), so the ONNX nodes map back to "layers.N.<path>" for the
    quantization rules; the rotary tables are precomputed by the model's own rotary module, so
    every rope variant it implements comes out right."""
    import torch

    from edgelm.arch import for_model

    gqa = _register_ops()
    arch, config = for_model(model), model.config
    paths = {id(module): name for name, module in model.named_modules()}
    attentions = [arch.attention(config, i) for i in range(len(arch.layers(model)))]
    tables = arch.rotary_tables(model, max_positions)
    keys = sorted({a.rotary for a in attentions if a.rotary is not None})
    qkv_path, gate_up_path = arch.packed_path(ATTENTION_INPUT), arch.packed_path(MLP_INPUT)
    o_path, down_path = arch.projections["o"], arch.projections["down"]

    class Layer(torch.nn.Module):
        def __init__(self, layer: Any, attention: Any) -> None:
            super().__init__()
            self.facts, self.inside = attention, rotary_inside(attention)
            self.table = keys.index(attention.rotary) if attention.rotary is not None else None
            norms, head_norms = arch.norms(layer), arch.head_norms(layer)
            self.attention_in, self.attention_out = norms.attention_in, norms.attention_out
            self.mlp_in, self.mlp_out = norms.mlp_in, norms.mlp_out
            self.q_norm, self.k_norm = head_norms or (None, None)
            qkv = [arch.role(layer, role, config) for role in ATTENTION_INPUT]
            gate_up = [arch.role(layer, role, config) for role in MLP_INPUT]
            self.qkv_sizes = [w.weight.shape[0] for w in qkv]
            self.gate_up_sizes = [w.weight.shape[0] for w in gate_up]
            _place(self, qkv_path, _packed(qkv))
            _place(self, gate_up_path, _packed(gate_up))
            _place(self, o_path, arch.role(layer, "o", config).linear)
            _place(self, down_path, arch.role(layer, "down", config).linear)
            self.act = arch.mlp_activation(layer)

        def attend(self, x, past_key, past_value, seqlens_k, total, caches, rotary):
            facts = self.facts
            qkv = _get(self, qkv_path)(x)
            key = value = None
            outside = facts.rotary is not None and not self.inside
            if self.q_norm is not None or outside:  # GroupQueryAttention then takes q, k, v apart
                qkv, key, value = qkv.split(self.qkv_sizes, dim=-1)
                if self.q_norm is not None:
                    qkv = self.q_norm(qkv.unflatten(-1, (facts.heads, facts.head_dim))).flatten(-2)
                    key = self.k_norm(key.unflatten(-1, (facts.kv_heads, facts.head_dim))).flatten(-2)
                if outside:
                    cos, sin = rotary[self.table]
                    qkv = rotate(qkv.unflatten(-1, (facts.heads, facts.head_dim)), cos, sin).flatten(-2)
                    key = rotate(key.unflatten(-1, (facts.kv_heads, facts.head_dim)), cos, sin).flatten(-2)
            cos, sin = caches[self.table] if self.inside else (None, None)
            out, present_key, present_value = gqa(
                qkv, key, value, past_key, past_value, seqlens_k, total, cos, sin, facts.heads, facts.kv_heads,
                float(facts.scale), float(facts.softcap or 0.0), int(facts.sliding_window or -1), int(self.inside))
            out = _get(self, o_path)(out)
            return (self.attention_out(out) if self.attention_out is not None else out), present_key, present_value

        def feed_forward(self, x):
            gate, up = _get(self, gate_up_path)(self.mlp_in(x)).split(self.gate_up_sizes, dim=-1)
            out = _get(self, down_path)(self.act(gate) * up)
            return self.mlp_out(out) if self.mlp_out is not None else out

    class Decoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embedding_path = paths[id(arch.embedding(model))]
            self.norm_path, self.head_path = paths[id(arch.final_norm(model))], paths[id(arch.head(model))]
            self.layers_path = paths[id(arch.layers(model))]
            self.softcap = arch.final_softcap(config)
            _place(self, self.embedding_path, arch.embedding(model))
            _place(self, self.norm_path, arch.final_norm(model))
            _place(self, self.head_path, arch.head(model))
            _place(self, self.layers_path, torch.nn.ModuleList(
                Layer(layer, attention) for layer, attention in zip(arch.layers(model), attentions)))
            for index, key in enumerate(keys):
                cos, sin = tables[key]
                half = cos.shape[-1] // 2  # transformers' tables repeat the frequencies twice
                self.register_buffer(f"cos_{index}", cos[:, :half].float().contiguous())
                self.register_buffer(f"sin_{index}", sin[:, :half].float().contiguous())
            self.outside = sorted({layer.table for layer in _get(self, self.layers_path)
                                   if layer.table is not None and not layer.inside})

        def forward(self, input_ids, attention_mask, *past):
            seqlens_k = (attention_mask.sum(dim=1) - 1).to(torch.int32)
            total = torch.tensor(attention_mask.shape[1], dtype=torch.int32)
            # positions of the new tokens per row, as GroupQueryAttention derives them (for the
            # layers whose rotary is applied here): the last one is seqlens_k
            positions = seqlens_k[:, None].long() + 1 - input_ids.shape[1] + torch.arange(input_ids.shape[1])
            caches = [(getattr(self, f"cos_{i}"), getattr(self, f"sin_{i}")) for i in range(len(keys))]
            rotary = {i: (torch.nn.functional.embedding(positions, caches[i][0])[:, :, None],
                          torch.nn.functional.embedding(positions, caches[i][1])[:, :, None]) for i in self.outside}
            hidden = _get(self, self.embedding_path)(input_ids)
            present = []
            for i, layer in enumerate(_get(self, self.layers_path)):
                out, key, value = layer.attend(layer.attention_in(hidden), past[2 * i], past[2 * i + 1], seqlens_k,
                                               total, caches, rotary)
                hidden = hidden + out
                hidden = hidden + layer.feed_forward(hidden)
                present += [key, value]
            logits = _get(self, self.head_path)(_get(self, self.norm_path)(hidden))
            if self.softcap:
                logits = torch.tanh(logits / self.softcap) * self.softcap
            return (logits, *present)

    return Decoder().eval()
