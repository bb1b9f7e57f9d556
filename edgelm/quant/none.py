"""No quantization (NoQuantization): the fp32 export is the bundle's graph. A scheme like the
others, so the stages ask it too (no pre-export pass, no ONNX pass, no hardware needs)."""

from __future__ import annotations

from typing import Any

from edgelm.config.profile import NoQuantization
from edgelm.quant.base import Scheme


def quantize(state: Any, settings: NoQuantization, progress: Any) -> dict[str, Any]:
    return {"mode": settings.mode}


SCHEME = Scheme(mode="none", quantize=quantize, label=lambda profile: "fp32", note=lambda facts: "none (fp32)",
                export_refusal=lambda export, settings: None,  # any graph can stay fp32
                adapter_dtype="float32")  # an fp32 bundle keeps adapters exact: it equals the merged model
