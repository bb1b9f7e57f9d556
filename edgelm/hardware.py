"""Build preflight: warn when the chosen profile will not be accelerated on this CPU.

A profile whose scheme computes in int8 (edgelm/quant/: static QDQ, weight-only at level 4) runs slower
than fp32 on a CPU without int8 dot-product instructions (AVX512-VNNI, AVX-VNNI, AMX, ARM
dotprod/i8mm): onnxruntime#17389. The host's features (edgelm_runtime.hardware, AMX probed, not
read from CPUID) go into every manifest as provenance.build_host."""

from __future__ import annotations

from typing import Any


def hardware_needs(profile: Any) -> frozenset[str]:
    """The host features (edgelm_runtime.hardware.host_features keys) the profile's quantization
    scheme needs to run fast, as its unit in edgelm/quant/ states them."""
    from edgelm.quant import scheme_for

    return scheme_for(profile.quantization).needs(profile.quantization)


def computes_in_int8(profile: Any) -> bool:
    """The profile's MatMuls run int8 x int8 (what VNNI / dotprod / AMX accelerate)."""
    from edgelm.quant.base import INT8_DOT_PRODUCT

    return INT8_DOT_PRODUCT in hardware_needs(profile)


def preflight_warnings(profile: Any, host: dict[str, Any]) -> list[str]:
    """What the user should know before building `profile` here (never an error: the bundle may
    be meant for another machine)."""
    warnings = []
    if profile.provider == "CPUExecutionProvider" and computes_in_int8(profile) and not host["int8_dot_product"]:
        warnings.append(f"{profile.name} computes in int8, but this CPU ({host['cpu']}) has no int8 dot-product "
                        "instructions (AVX512-VNNI, AVX-VNNI, AMX, ARM dotprod): onnxruntime may run it slower than "
                        "fp32 here (onnxruntime#17389); build it for a CPU that has them, or use cpu-fp32 here")
    return warnings
