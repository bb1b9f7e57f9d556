"""What a quantization scheme is: one `Scheme` per profile config type, registered in
edgelm/quant/__init__.py. It carries the scheme's torch-side preparation, its ONNX pass, its labels
and its hardware needs, so stages, the preflight and the summary ask the unit, never the mode."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

# The pre-export passes a scheme may ask for (their stage names), each with the reason it records
# when the profile's scheme does not use it (the manifest and the summary show these).
PREP_PASSES: dict[str, Callable[[Any], str]] = {
    "rotate": lambda settings: ("quantization.rotation is none" if hasattr(settings, "rotation")  # Hadamard (QuaRot-style)
                                else f"quantization mode {settings.mode}"),
    "smooth": lambda settings: f"quantization mode {settings.mode}",   # activation stats + SmoothQuant
    "awq": lambda settings: "quantization.activation_aware is off",   # activation-aware weight scales
    "sensitivity": lambda settings: "mixed_precision is off",         # per-group int8 KL (mixed precision)
}

STAGE = "quantize"  # the stage that runs a scheme's ONNX pass (its name in StageError and progress)
INT8_DOT_PRODUCT = "int8_dot_product"  # host feature (edgelm_runtime.hardware): VNNI, AMX, ARM dotprod


def _no_needs(settings: Any) -> frozenset[str]:
    return frozenset()


def _dynamic_shapes_only(export: Any, settings: Any) -> str | None:
    if export.static_shapes:
        return f"quantization.mode: static graphs take none or static-qdq (got {settings.mode})"
    return None


@dataclass(frozen=True)
class Scheme:
    """One quantization scheme. Every callable takes the profile's `quantization` settings (of the
    config type the scheme is registered for) except `label` (the profile) and `note` (facts)."""

    mode: str                                             # the config's `mode` literal
    quantize: Callable[[Any, Any, Any], dict[str, Any]]   # (BuildState, settings, Progress) -> facts
    label: Callable[[Any], str]                           # profile -> precision in a few words (edgelm profiles)
    note: Callable[[dict[str, Any]], str]                 # quantize facts -> build summary / inspect row
    prep: Mapping[str, Callable[[Any], bool]] = field(default_factory=dict)  # pass -> applies to these settings?
    needs: Callable[[Any], frozenset[str]] = _no_needs     # host features its compute needs to be fast
    # (profile.export, settings) -> why the profile's export cannot take this scheme (the field named), or None
    export_refusal: Callable[[Any, Any], str | None] = _dynamic_shapes_only
    # runtime LoRA adapters (edgelm/stages/runtime_adapters.py): the dtype their A/B are stored and
    # fed in (computed in fp32 either way), or why this scheme's graphs cannot take them
    adapter_dtype: str = "float16"
    adapter_refusal: str | None = None

    def skip_reason(self, pass_name: str, settings: Any) -> str | None:
        """None when the pre-export pass `pass_name` applies to `settings`, else why it is skipped."""
        if pass_name not in PREP_PASSES:
            raise KeyError(f"unknown pre-export pass {pass_name!r} (known: {', '.join(PREP_PASSES)})")
        applies = self.prep.get(pass_name)
        return None if applies is not None and applies(settings) else PREP_PASSES[pass_name](settings)
