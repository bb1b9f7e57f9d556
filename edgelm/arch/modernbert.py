"""ModernBERT: rotary positions, packed Wqkv, GeGLU MLP, no token types, a prediction head before
the classifier, and layers that alternate global attention with a sliding window (layer_types).
The MultiHeadAttention route takes only a padding mask, so ModernBERT exports its attention in
plain ops (transformers' eager attention, window masks included) and needs no attention fusion."""

from typing import Any

from edgelm.arch.encoder import EncoderArch


class ModernBert(EncoderArch):
    name = "modernbert"
    head_modules = ("head", "classifier")
    attention_projections = ("Wqkv",)

    def takes_token_type_ids(self, config: Any) -> bool:
        return False

    def attention_refusal(self, config: Any) -> str | None:
        if "sliding_attention" in (getattr(config, "layer_types", None) or ()):
            return (f"sliding-window layers (local_attention {config.local_attention}) need their own mask; "
                    "attention exported in plain ops")
        return None


ARCH = ModernBert()
