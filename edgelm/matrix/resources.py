"""How much memory a build task asks Ray for: from the model's fp32 weight bytes, with the ratio
that builds measured, so Ray never places two builds on a node that cannot hold both.

Measured peak RSS (Intel Xeon, 2 CPUs, 2026-12-03; docs/matrix.md): `edgelm build` of SmolLM2-135M
(0.50 GiB fp32) cpu-int8 5.37 GiB, cpu-int4 4.75 GiB; a random-initialised model at Qwen2.5-0.5B's
shape (1.84 GiB fp32) cpu-int4 14.9 GiB (issue 26). A line through them: about 1.8 GiB of libraries
plus 7.1× the fp32 weights. Inside a Ray worker the same builds peaked up to 0.65 GiB higher (6.02
GiB for SmolLM2 cpu-int8: the worker's own Ray client), so 2.5 GiB + 7.5× is reserved. A matrix
file's `resources.memory_gb` replaces the estimate (e.g. once builds stream their weights)."""

from __future__ import annotations

from edgelm.config.plan import BuildPlan

BASE_BYTES = int(2.5 * 2**30)
PER_FP32_BYTE = 7.5


def build_memory_bytes(plan: BuildPlan) -> int:
    """The peak RSS to reserve for building `plan`."""
    from edgelm.stages.load.model import locate_model
    from edgelm.stages.load.weights import parameter_count

    return int(BASE_BYTES + PER_FP32_BYTE * 4 * parameter_count(*locate_model(plan.model)))
