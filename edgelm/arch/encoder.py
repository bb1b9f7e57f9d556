"""What the build may know about an encoder family (BERT and its kin), in one interface.

A family module (bert.py, roberta.py, distilbert.py) subclasses `EncoderArch` and states where it
differs: the config fields of its sizes, whether its graph takes token_type_ids, and the module
paths of its classification head. Attention needs no family knowledge: every family runs it
through transformers' AttentionInterface, which the export replaces (export/encoder_attention.py).
The facts are read from the transformers config."""

from __future__ import annotations

from typing import Any, ClassVar


class EncoderArch:
    """A BERT-shaped encoder: config.hidden_size / num_attention_heads / num_hidden_layers, and
    token_type_ids when the config has more than one token type."""

    name: ClassVar[str] = "bert"
    # onnxruntime.transformers.optimizer's model_type whose passes fit this family's graph
    optimizer_model_type: ClassVar[str] = "bert"
    # the modules a classification head is made of (peft modules_to_save of a classifier adapter)
    head_modules: ClassVar[tuple[str, ...]] = ("classifier",)
    # peft target_modules of the attention projections (the example's LoRA)
    attention_projections: ClassVar[tuple[str, ...]] = ("query", "key", "value")

    def sizes(self, config: Any) -> tuple[int, int, int]:
        """(hidden size, attention heads, layers)."""
        return int(config.hidden_size), int(config.num_attention_heads), int(config.num_hidden_layers)

    def takes_token_type_ids(self, config: Any) -> bool:
        return int(getattr(config, "type_vocab_size", 0) or 0) > 1

    def max_positions(self, config: Any) -> int:
        """The longest input in tokens, special tokens included."""
        return int(config.max_position_embeddings)

    def attention_refusal(self, config: Any) -> str | None:
        """Why attention cannot be one MultiHeadAttention with a padding mask (None: it can); the
        export then keeps transformers' eager attention in plain ops."""
        return None
