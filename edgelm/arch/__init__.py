"""Model families behind one interface each: decoders behind base.DecoderArch, encoders behind
encoder.EncoderArch. Stages ask `for_model(model)` / `for_config(config)` (decoders) or
`encoder_for_config(config)`; no module outside this package names a family's module paths."""

from __future__ import annotations

from typing import Any

from edgelm.arch import bert, distilbert, gemma3, llama, mistral, modernbert, phi3, qwen2, qwen3, roberta, smollm3
from edgelm.arch.encoder import EncoderArch
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
ENCODER_ARCHS: dict[str, EncoderArch] = {
    "bert": bert.ARCH,
    "roberta": roberta.ARCH,
    "xlm-roberta": roberta.ARCH,
    "distilbert": distilbert.ARCH,
    "modernbert": modernbert.ARCH,
}

__all__ = ["ARCHS", "ENCODER_ARCHS", "DecoderArch", "EncoderArch", "encoder_for_config", "InputGroup", "LayerAttention", "LayerNorms", "NormFold", "RoleWeight",
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


def encoder_for_config(config: Any, where: str = "model") -> EncoderArch:
    model_type = getattr(config, "model_type", None)
    arch = ENCODER_ARCHS.get(model_type)
    if arch is None:
        raise ModelLoadError(f"{where}: encoder architecture {model_type!r} is not supported",
                             hint=f"supported encoder model types: {', '.join(ENCODER_ARCHS)}")
    return arch
