"""Qwen2 / Qwen2.5: Llama's shape with q/k/v biases (carried by the Linears themselves); sliding
layers only where layer_types says so (use_sliding_window)."""

from edgelm.arch.base import DecoderArch


class Qwen2(DecoderArch):
    name = "qwen2"


ARCH = Qwen2()
