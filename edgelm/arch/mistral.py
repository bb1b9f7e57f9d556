"""Mistral: Llama's shape; a config sliding_window (no layer_types) applies to every layer."""

from edgelm.arch.base import DecoderArch


class Mistral(DecoderArch):
    name = "mistral"


ARCH = Mistral()
