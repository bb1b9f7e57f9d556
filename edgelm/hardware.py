"""Build preflight: warn when the chosen profile will not be accelerated on this CPU.

A profile that computes in int8 (static QDQ, or weight-only at accuracy level 4) runs slower
than fp32 on a CPU without int8 dot-product instructions (AVX512-VNNI, AVX-VNNI, AMX, ARM
dotprod/i8mm): onnxruntime#17389. The host's features (edgelm_runtime.hardware, AMX probed, not
read from CPUID) go into every manifest as provenance.build_host."""

from __future__ import annotations

from typing import Any


def computes_in_int8(profile: Any) -> bool:
    """The profile's MatMuls run int8 x int8 (what VNNI / dotprod / AMX accelerate)."""
    quantization = profile.quantization
    if quantization.mode == "static-qdq":
        return True
    return quantization.mode == "weight-only" and getattr(quantization, "accuracy_level", 0) == 4


def preflight_warnings(profile: Any, host: dict[str, Any]) -> list[str]:
    """What the user should know before building `profile` here (never an error: the bundle may
    be meant for another machine)."""
    warnings = []
    if profile.provider == "CPUExecutionProvider" and computes_in_int8(profile) and not host["int8_dot_product"]:
        warnings.append(f"{profile.name} computes in int8, but this CPU ({host['cpu']}) has no int8 dot-product "
                        "instructions (AVX512-VNNI, AVX-VNNI, AMX, ARM dotprod): onnxruntime may run it slower than "
                        "fp32 here (onnxruntime#17389); build it for a CPU that has them, or use cpu-fp32 here")
    return warnings
