"""RoBERTa and XLM-RoBERTa: BERT's shape with one token type (no token_type_ids input) and
positions that start after the padding index (pad_token_id + 1), so two fewer usable positions."""

from typing import Any

from edgelm.arch.encoder import EncoderArch


class Roberta(EncoderArch):
    name = "roberta"

    def max_positions(self, config: Any) -> int:
        return int(config.max_position_embeddings) - int(config.pad_token_id or 0) - 1


ARCH = Roberta()
