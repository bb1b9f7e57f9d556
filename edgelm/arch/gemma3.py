"""Gemma 3 (text): four (1 + w) RMSNorms per layer (before/after attention, before/after the MLP),
q/k norms, interleaved sliding-window and global layers each with its own rope theta
(rope_parameters per layer type), embeddings scaled by sqrt(hidden) inside the embedding module,
attention scaled by query_pre_attn_scalar^-0.5, optional logit soft-caps, a GELU-tanh MLP.

SmoothQuant/AWQ fold the MLP input's scale into pre_feedforward_layernorm, not into
post_attention_layernorm (that one normalises the attention output before the residual add)."""

from typing import Any

from edgelm.arch.base import DecoderArch


class Gemma3Text(DecoderArch):
    name = "gemma3_text"
    attention_out_norm = "post_attention_layernorm"
    mlp_in_norm = "pre_feedforward_layernorm"
    mlp_out_norm = "post_feedforward_layernorm"
    qk_norms = ("self_attn.q_norm", "self_attn.k_norm")
    norm_offset = 1.0

    def rotary_key(self, config: Any, index: int) -> str | None:
        return config.layer_types[index]

    def rotary_tables(self, model: Any, positions: int) -> dict[str, tuple[Any, Any]]:
        import torch

        tables = {}
        with torch.no_grad():
            x = self.embedding(model).weight[:1].float()
            for layer_type in sorted(set(model.config.layer_types)):
                cos, sin = model.model.rotary_emb(x, torch.arange(positions)[None], layer_type)
                tables[layer_type] = (cos[0].float(), sin[0].float())
        return tables

    def rotary_dim(self, config: Any, head_dim: int) -> int:
        return head_dim

    def attention_scale(self, config: Any, head_dim: int) -> float:
        return config.query_pre_attn_scalar ** -0.5

    def attention_softcap(self, config: Any) -> float | None:
        # transformers' Gemma3Attention never passes config.attn_logit_softcapping to its attention
        # function (Gemma 2's does): Gemma 3's scores are uncapped whatever the config says (measured)
        return None

    def final_softcap(self, config: Any) -> float | None:
        return getattr(config, "final_logit_softcapping", None)


ARCH = Gemma3Text()
