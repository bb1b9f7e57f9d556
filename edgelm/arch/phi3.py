"""Phi-3 / Phi-4-mini: packed projections (qkv_proj = [q; k; v], gate_up_proj = [gate; up]),
partial rotary (rope_parameters.partial_rotary_factor, 0.75 in Phi-4-mini) and longrope.

longrope switches to its long factors once a sequence passes original_max_position_embeddings,
for every position of that sequence; a bundle's precomputed rotary table cannot follow that, so a
longer context than that is refused (Phi-4-mini: 4096)."""

from typing import Any

from edgelm.arch.base import DecoderArch


class Phi3(DecoderArch):
    name = "phi3"
    projections = {"q": "self_attn.qkv_proj", "k": "self_attn.qkv_proj", "v": "self_attn.qkv_proj",
                   "o": "self_attn.o_proj", "gate": "mlp.gate_up_proj", "up": "mlp.gate_up_proj",
                   "down": "mlp.down_proj"}

    def mlp_activation(self, layer: Any) -> Any:
        return layer.mlp.activation_fn

    def check_context(self, config: Any, max_seq_len: int) -> str | None:
        rope = getattr(config, "rope_parameters", None) or {}
        original = getattr(config, "original_max_position_embeddings", None)
        if rope.get("rope_type") == "longrope" and original and max_seq_len > original:
            return (f"longrope uses its long factors past original_max_position_embeddings ({original}) for the whole "
                    f"sequence, which a precomputed rotary table cannot follow; use --max-seq-len {original} or less")
        return None


ARCH = Phi3()
