"""The Quantize stage: runs the ONNX pass of the profile's quantization scheme (edgelm/quant/:
static QDQ calibrated on real prompts, weight-only MatMulNBits, fp16, or none). The stage knows no
scheme; the unit registered for the profile's config type does the work and returns its facts,
which the QuantizeResult keeps (and the scheme words: Scheme.note)."""

from __future__ import annotations

from edgelm.pipeline.results import QuantizeResult
from edgelm.pipeline.stage import BuildState, Progress
from edgelm.quant import scheme_for


class Quantize:
    name = "quantize"
    title = "Quantize (static int8 QDQ with calibration, or weight-only MatMulNBits)"

    def run(self, state: BuildState, progress: Progress) -> QuantizeResult:
        settings = state.plan.profile.quantization
        facts = dict(scheme_for(settings).quantize(state, settings, progress))
        return QuantizeResult(mode=facts.pop("mode"), details=facts)
