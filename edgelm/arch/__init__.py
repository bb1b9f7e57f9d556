"""Model families behind one interface (base.DecoderArch). Stages ask `for_model(model)` or
`for_config(config)`; no module outside this package names a family's module paths."""

from __future__ import annotations

from typing import Any

from edgelm.arch import gemma3, llama, mistral, phi3, qwen2, qwen3, smollm3
from edgelm.arch.base import DecoderArch, InputGroup, LayerAttention, LayerNorms, NormFold, RoleWeight, shrink_linear
from edgelm.errors import ModelLoadError

ARCHS: dict[str, DecoderArch] = {
    "llama": llama.ARCH,
    "mistral": mistral.ARCH,
    "qwen2": qwen2.ARCH,
    "qwen3": qwen3.ARCH,
    "gemma3_text": gemma3.ARCH,
    "phi3": phi3.ARCH,
    "smollm3": smollm3.ARCH,
}

__all__ = ["ARCHS", "DecoderArch", "InputGroup", "LayerAttention", "LayerNorms", "NormFold", "RoleWeight",
           "for_config", "for_model", "shrink_linear"]


def for_config(config: Any, where: str = "model") -> DecoderArch:
    model_type = getattr(config, "model_type", None)
    arch = ARCHS.get(model_type)
    if arch is None:
        hint = f"supported model types: {', '.join(ARCHS)}"
        if model_type == "gemma3":
            hint = "this is the multimodal Gemma 3 (gemma3); save its text model (Gemma3ForCausalLM, gemma3_text). " + hint
        raise ModelLoadError(f"{where}: architecture {model_type!r} is not supported", hint=hint)
    return arch


def for_model(model: Any) -> DecoderArch:
    return for_config(model.config)
