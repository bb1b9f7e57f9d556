"""BERT (and MiniLM, which is a BERT): the reference encoder shape, EncoderArch's defaults."""

from edgelm.arch.encoder import EncoderArch


class Bert(EncoderArch):
    name = "bert"


ARCH = Bert()
