"""What every stage may know about a decoder family, in one interface.

A family module (llama.py, gemma3.py, ...) subclasses `DecoderArch` and states only where it
differs: its module paths inside a layer, packed projections, which norm feeds which projections
and how a per-channel scale folds into it, and its attention facts per layer (heads, rotary table,
sliding window, scale, soft-cap, q/k norms). Stages ask an arch; none of them names a module path.
The facts are read from the transformers config, never guessed from module names."""

from __future__ import annotations

import re

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

ROLES = ("q", "k", "v", "o", "gate", "up", "down")
ATTENTION_INPUT, MLP_INPUT = ("q", "k", "v"), ("gate", "up")


# What a Hugging Face checkpoint of these families names its tensors, for the config-vs-weights
# check before anything loads (edgelm/stages/load/weights.py): the embedding, a layer's index, and
# the first layer's down / q / k / packed qkv projections (Phi-3 packs q, k and v).
CHECKPOINT_TENSORS = ("embed_tokens.weight", re.compile(r"(?:^|\.)layers\.(\d+)\."),
                      ("mlp.down_proj.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
                       "self_attn.qkv_proj.weight"))

@dataclass(frozen=True)
class RoleWeight:
    """Where one role's weight lives: rows `rows` of the Linear at `path` (module path inside the
    layer); a packed Linear (Phi-3's qkv_proj) holds several roles, each a row range of it."""

    linear: Any
    rows: slice
    path: str

    @property
    def weight(self) -> Any:
        return self.linear.weight[self.rows]

    @property
    def bias(self) -> Any:
        return None if self.linear.bias is None else self.linear.bias[self.rows]

    def divide_rows(self, scale: Any) -> None:
        """Divide this role's output rows by `scale` (one value per row), in place."""
        self.linear.weight[self.rows].div_(scale[:, None])
        if self.linear.bias is not None:
            self.linear.bias[self.rows].div_(scale)


@dataclass(frozen=True)
class NormFold:
    """A norm whose output feeds a group of Linears: a scale s on that output folds into its weight.
    `offset` 1 for norms computing x_hat * (1 + w) (Gemma): the new w is (1 + w) / s - 1."""

    norm: Any
    offset: float = 0.0

    def divide(self, scale: Any) -> None:
        weight = self.norm.weight
        weight.copy_((weight + self.offset) / scale - self.offset)


@dataclass(frozen=True)
class InputGroup:
    """Linears that read one activation, and where a per-channel scale on it folds.
    key: the module path (from the layers' parent, e.g. "layers.3.mlp.down_proj") of the first
    reader, under which activation statistics are gathered. fold: a NormFold, a producer's rows
    (RoleWeight) or None (no fold: `reason`)."""

    key: str
    readers: tuple[Any, ...]
    fold: NormFold | RoleWeight | None
    reason: str = ""


@dataclass(frozen=True)
class LayerAttention:
    """One layer's attention facts. rotary: the key of its rotary table in `rotary_tables`, None
    for a layer without rotary (SmolLM3's NoPE layers); rotary_dim < head_dim is partial rotary."""

    heads: int
    kv_heads: int
    head_dim: int
    rotary: str | None
    rotary_dim: int
    sliding_window: int | None  # a query sees itself and the window - 1 keys before it
    scale: float
    softcap: float | None


@dataclass(frozen=True)
class LayerNorms:
    """The norms of one layer: before attention, after attention (Gemma's post-norms, applied to
    the branch output before the residual add), before the MLP, after the MLP."""

    attention_in: Any
    attention_out: Any | None
    mlp_in: Any
    mlp_out: Any | None


class DecoderArch:
    """A Llama-shaped decoder: model.model.{embed_tokens, layers, norm, rotary_emb}, model.lm_head,
    layer.{input_layernorm, self_attn, post_attention_layernorm, mlp}. Families override the
    class attributes and the few methods where they differ."""

    name: ClassVar[str] = "llama"
    # role -> module path inside a layer; roles sharing a path are packed in that order
    projections: ClassVar[Mapping[str, str]] = {
        "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
        "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
    attention_in_norm: ClassVar[str] = "input_layernorm"
    attention_out_norm: ClassVar[str | None] = None
    mlp_in_norm: ClassVar[str] = "post_attention_layernorm"
    mlp_out_norm: ClassVar[str | None] = None
    qk_norms: ClassVar[tuple[str, str] | None] = None  # (q norm, k norm) paths, per head
    norm_offset: ClassVar[float] = 0.0                  # 1.0: norms compute x_hat * (1 + w)
    layers_prefix: ClassVar[str] = "layers"             # module path of the layers under model.model
    # config lists with one entry per layer, trimmed when layers are dropped
    per_layer_config: ClassVar[tuple[str, ...]] = ("layer_types",)
    # where a route that packs a role group into one Linear (the fused export) puts it
    packed_projections: ClassVar[Mapping[tuple[str, ...], str]] = {
        ATTENTION_INPUT: "self_attn.qkv_proj", MLP_INPUT: "mlp.gate_up_proj"}

    # --- model level -----------------------------------------------------------------------
    def layers(self, model: Any) -> Any:
        return model.model.layers

    def set_layers(self, model: Any, keep: list[int]) -> None:
        """Keep only the layers at `keep` (in order): renumbered, per-layer config lists trimmed."""
        import torch

        layers = self.layers(model)
        model.model.layers = torch.nn.ModuleList(layers[i] for i in keep)
        for index, layer in enumerate(model.model.layers):
            layer.self_attn.layer_idx = index
        config = model.config
        for field in self.per_layer_config:
            values = getattr(config, field, None)
            if values:
                setattr(config, field, [values[i] for i in keep])
        config.num_hidden_layers = len(keep)

    def embedding(self, model: Any) -> Any:
        """The token embedding module (its forward applies any embedding scale)."""
        return model.model.embed_tokens

    def final_norm(self, model: Any) -> Any:
        return model.model.norm

    def head(self, model: Any) -> Any:
        return model.lm_head

    def final_softcap(self, config: Any) -> float | None:
        return None

    def rotary_tables(self, model: Any, positions: int) -> dict[str, tuple[Any, Any]]:
        """{table key: (cos, sin)}, each (positions, rotary_dim) in fp32, as the model's own
        rotary module computes them (so every rope scaling it implements comes out right)."""
        import torch

        with torch.no_grad():
            x = self.embedding(model).weight[:1].float()
            cos, sin = model.model.rotary_emb(x, torch.arange(positions)[None])
        return {"default": (cos[0].float(), sin[0].float())}

    # --- layer level -----------------------------------------------------------------------
    def config_attention(self, config: Any) -> tuple[int, int, int]:
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return heads, kv_heads, head_dim

    def attention(self, config: Any, index: int) -> LayerAttention:
        heads, kv_heads, head_dim = self.config_attention(config)
        return LayerAttention(heads, kv_heads, head_dim, rotary=self.rotary_key(config, index),
                              rotary_dim=self.rotary_dim(config, head_dim), sliding_window=self.sliding_window(config, index),
                              scale=self.attention_scale(config, head_dim), softcap=self.attention_softcap(config))

    def rotary_key(self, config: Any, index: int) -> str | None:
        return "default"

    def rotary_dim(self, config: Any, head_dim: int) -> int:
        factor = (getattr(config, "rope_parameters", None) or {}).get("partial_rotary_factor", 1.0)
        return int(head_dim * factor)

    def sliding_window(self, config: Any, index: int) -> int | None:
        """The window of layer `index`: transformers' rule is layer_types[index] == "sliding_attention"
        (when the config has layer_types), else the config's sliding_window for every layer."""
        window = getattr(config, "sliding_window", None)
        types = getattr(config, "layer_types", None)
        if window is None or (types and types[index] != "sliding_attention"):
            return None
        return int(window)

    def attention_scale(self, config: Any, head_dim: int) -> float:
        return head_dim ** -0.5

    def attention_softcap(self, config: Any) -> float | None:
        return None

    def norms(self, layer: Any) -> LayerNorms:
        get = _getter(layer)
        return LayerNorms(get(self.attention_in_norm), get(self.attention_out_norm) if self.attention_out_norm else None,
                          get(self.mlp_in_norm), get(self.mlp_out_norm) if self.mlp_out_norm else None)

    def head_norms(self, layer: Any) -> tuple[Any, Any] | None:
        """(q norm, k norm): RMSNorms over head_dim applied to q and k before rotary, or None."""
        if self.qk_norms is None:
            return None
        get = _getter(layer)
        return get(self.qk_norms[0]), get(self.qk_norms[1])

    def mlp_activation(self, layer: Any) -> Any:
        return layer.mlp.act_fn

    def attention_module(self, layer: Any) -> Any:
        return layer.self_attn

    def set_attention_heads(self, layer: Any, heads: int, kv_heads: int) -> None:
        """After KV groups are removed: the head counts an attention module copied from its config
        at init (Phi-3 splits its packed qkv output by its own num_key_value_heads)."""
        attention = self.attention_module(layer)
        for field, value in (("num_heads", heads), ("num_attention_heads", heads), ("num_key_value_heads", kv_heads)):
            if isinstance(getattr(attention, field, None), int):
                setattr(attention, field, value)

    def linear_paths(self) -> tuple[str, ...]:
        """The distinct Linear module paths of one layer (a packed Linear once), in role order."""
        return tuple(dict.fromkeys(self.projections[role] for role in ROLES))

    def packed_path(self, roles: tuple[str, ...]) -> str:
        """The module path of `roles` packed into one Linear: the family's own Linear where it
        already packs them (Phi-3), else packed_projections[roles]."""
        paths = {self.projections[role] for role in roles}
        return paths.pop() if len(paths) == 1 else self.packed_projections[tuple(roles)]

    def linear_names(self) -> tuple[str, ...]:
        """Their leaf names (peft target_modules)."""
        return tuple(dict.fromkeys(path.rsplit(".", 1)[-1] for path in self.linear_paths()))

    def role(self, layer: Any, role: str, config: Any) -> RoleWeight:
        path = self.projections[role]
        linear = _getter(layer)(path)
        sharing = [r for r in ROLES if self.projections[r] == path]
        sizes = [self._rows(r, linear, config, len(sharing)) for r in sharing]
        start = sum(sizes[: sharing.index(role)])
        return RoleWeight(linear, slice(start, start + sizes[sharing.index(role)]), path)

    def _rows(self, role: str, linear: Any, config: Any, sharing: int) -> int:
        if sharing == 1:
            return linear.out_features
        heads, kv_heads, head_dim = self.config_attention(config)
        if role == "q":
            return heads * head_dim
        if role in ("k", "v"):
            return kv_heads * head_dim
        return linear.out_features // sharing  # gate/up: equal halves

    def keep_rows(self, layer: Any, keep: Mapping[str, Any], config: Any) -> None:
        """Rebuild the Linears holding the roles in `keep` with only those output rows of each
        role (an index tensor per role); packed Linears keep every role's chosen rows, in order."""
        import torch

        paths = dict.fromkeys(self.projections[role] for role in keep)
        for path in paths:
            roles = [r for r in ROLES if self.projections[r] == path]
            weights = [self.role(layer, r, config) for r in roles]
            rows = torch.cat([w.rows.start + (keep[r] if r in keep else torch.arange(w.rows.stop - w.rows.start))
                              for r, w in zip(roles, weights)])
            self.set_linear(layer, path, shrink_linear(weights[0].linear, rows=rows))

    def keep_columns(self, layer: Any, role: str, columns: Any) -> None:
        path = self.projections[role]
        self.set_linear(layer, path, shrink_linear(_getter(layer)(path), columns=columns))

    def set_linear(self, layer: Any, path: str, linear: Any) -> None:
        parent, _, leaf = path.rpartition(".")
        setattr(_getter(layer)(parent) if parent else layer, leaf, linear)

    def input_groups(self, layer: Any, index: int, config: Any) -> tuple[InputGroup, ...]:
        """The activations of layer `index` that int8/int4 preparation scales, with their fold:
        attention input -> its norm, MLP input -> its norm, down's input -> up's rows.
        (o's input folds into v's rows per KV head: SmoothQuant handles that GQA case itself.)"""
        prefix = f"{self.layers_prefix}.{index}."
        norms = self.norms(layer)

        def readers(roles: tuple[str, ...]) -> tuple[Any, ...]:
            return tuple(dict.fromkeys(self.role(layer, r, config).linear for r in roles))

        return (InputGroup(prefix + self.projections["q"], readers(ATTENTION_INPUT), NormFold(norms.attention_in, self.norm_offset)),
                InputGroup(prefix + self.projections["gate"], readers(MLP_INPUT), NormFold(norms.mlp_in, self.norm_offset)),
                InputGroup(prefix + self.projections["down"], readers(("down",)), self.role(layer, "up", config)))

    def module_path(self, index: int, role: str) -> str:
        """The statistics key of a role's Linear in layer `index` ("layers.3.mlp.down_proj")."""
        return f"{self.layers_prefix}.{index}.{self.projections[role]}"

    def layer_linears(self, model: Any) -> dict[str, Any]:
        """{module path under model.model ("layers.0.self_attn.q_proj"): Linear} of every layer."""
        out = {}
        for index, layer in enumerate(self.layers(model)):
            get = _getter(layer)
            for path in self.linear_paths():
                out[f"{self.layers_prefix}.{index}.{path}"] = get(path)
        return out

    def sensitivity_group(self, path: str) -> str:
        """Linears that read one input are measured as one group: the attention input's readers
        (q/k/v; a packed qkv Linear is its own group)."""
        attention_in = {self.projections[r] for r in ATTENTION_INPUT}
        if len(attention_in) > 1 and any(path.endswith("." + p) for p in attention_in):
            return path.rsplit(".", 1)[0] + ".qkv"
        return path

    def check_context(self, config: Any, max_seq_len: int) -> str | None:
        """Why a bundle of `max_seq_len` positions would not compute what transformers does."""
        return None

    # --- what a route cannot express ---------------------------------------------------------
    def fused_refusal(self, model: Any) -> str | None:
        """Why the GroupQueryAttention route cannot express this model (None: it can)."""
        return None

    def static_refusal(self, model: Any, span: int) -> str | None:
        """Why the fixed-shape NPU graphs (one attention bias for every layer over `span` slots)
        cannot express this model (None: they can)."""
        windows = {self.sliding_window(model.config, i) for i in range(model.config.num_hidden_layers)} - {None}
        if any(window < span for window in windows):
            return (f"sliding-window layers (window {min(windows)}) need a per-layer mask; the fixed-shape graphs take one "
                    f"attention bias over {span} slots")
        return None


def shrink_linear(linear: Any, rows: Any = None, columns: Any = None) -> Any:
    """A new Linear with only the given output rows / input columns of `linear`'s weight."""
    import torch

    weight, bias = linear.weight.data, linear.bias.data if linear.bias is not None else None
    if rows is not None:
        weight, bias = weight[rows], (bias[rows] if bias is not None else None)
    if columns is not None:
        weight = weight[:, columns]
    out = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
    out.weight.data.copy_(weight)
    if bias is not None:
        out.bias.data.copy_(bias)
    return out


def _getter(root: Any):
    def get(path: str) -> Any:
        module = root
        for part in path.split("."):
            module = getattr(module, part)
        return module

    return get
