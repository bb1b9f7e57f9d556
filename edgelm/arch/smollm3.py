"""SmolLM3: Llama's shape where every `no_rope_layer_interval`-th layer has no rotary
(config.no_rope_layers[i] == 0: NoPE); sliding layers only with use_sliding_window."""

from typing import Any

from edgelm.arch.base import DecoderArch


class SmolLM3(DecoderArch):
    name = "smollm3"
    per_layer_config = ("layer_types", "no_rope_layers")

    def rotary_key(self, config: Any, index: int) -> str | None:
        return "default" if config.no_rope_layers[index] else None

    def sliding_window(self, config: Any, index: int) -> int | None:
        return super().sliding_window(config, index) if getattr(config, "use_sliding_window", False) else None


ARCH = SmolLM3()
