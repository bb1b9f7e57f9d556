"""Qwen3: Qwen2's shape without biases, plus RMSNorms over head_dim on q and k before rotary."""

from edgelm.arch.base import DecoderArch


class Qwen3(DecoderArch):
    name = "qwen3"
    qk_norms = ("self_attn.q_norm", "self_attn.k_norm")


ARCH = Qwen3()
