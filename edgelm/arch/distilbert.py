"""DistilBERT: its own config names (dim, n_heads, n_layers), no token types, a two-layer
classification head (pre_classifier, classifier) and q_lin/k_lin/v_lin projections."""

from typing import Any

from edgelm.arch.encoder import EncoderArch


class DistilBert(EncoderArch):
    name = "distilbert"
    head_modules = ("pre_classifier", "classifier")
    attention_projections = ("q_lin", "k_lin", "v_lin")

    def sizes(self, config: Any) -> tuple[int, int, int]:
        return int(config.dim), int(config.n_heads), int(config.n_layers)

    def takes_token_type_ids(self, config: Any) -> bool:
        return False


ARCH = DistilBert()
