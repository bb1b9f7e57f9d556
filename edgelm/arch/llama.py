"""Llama (and Llama 3.2): the reference shape. Everything it needs is DecoderArch's default;
llama3 rope scaling comes from the model's own rotary module, tied embeddings from the weights."""

from edgelm.arch.base import DecoderArch


class Llama(DecoderArch):
    name = "llama"


ARCH = Llama()
