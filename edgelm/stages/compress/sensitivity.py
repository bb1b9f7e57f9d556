"""Measure how much each weight-MatMul group hurts the model when it alone is quantized.

The mixed-precision search restores the most damaging groups to higher precision first, so
the order matters: an input's outlier ratio is only a proxy (a huge outlier in a channel whose
weights are small costs little). Here each group (the family's arch groups the Linears that read
one input: separate q/k/v share the attention input; every other Linear, packed ones included,
stands alone) is fake-quantized alone in PyTorch — activations per-tensor with the calibration
min/max, weights per output channel, as onnxruntime's QDQ quantizer will do it — and the KL
divergence of the final next-token distribution from the float model's is measured on a few
calibration samples, cut into one batch of equal windows. One batched forward pass per group."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from edgelm.config.profile import StaticQDQ
from edgelm.pipeline.results import SensitivityResult, SmoothResult
from edgelm.pipeline.stage import BuildState, Progress
from edgelm.quant import scheme_for
from edgelm.calibration import plan_token_ids

PROBE_WINDOWS, PROBE_TOKENS = 4, 128  # one [4, 128] batch per group: 8 unbatched samples took 835 s on SmolLM2


def group_key(module: str, arch: Any = None) -> str:
    """The input a Linear reads (`arch.sensitivity_group`): q/k/v read one (the attention norm's
    output), the rest their own. Without an arch, the Llama-shaped default: every family with
    separate q/k/v names them alike, and a packed Linear is its own group under any arch."""
    if arch is None:
        from edgelm.arch import ARCHS

        arch = ARCHS["llama"]
    return arch.sensitivity_group(module)


def _fake_quant_activation(x: Any, low: float, high: float, levels: int) -> Any:
    import torch

    low, high = min(low, 0.0), max(high, 0.0)
    scale = max(high - low, 1e-12) / (levels - 1)
    zero = round(-low / scale)
    return (torch.clamp(torch.round(x / scale) + zero, 0, levels - 1) - zero) * scale


def _fake_quant_weight(weight: Any, settings: StaticQDQ) -> Any:
    """Per output channel (a row of the PyTorch weight); int8 symmetric, uint8 asymmetric."""
    import torch

    bits = 7 if settings.reduce_range else 8
    if settings.weight_dtype == "int8":
        scale = weight.abs().amax(1, keepdim=True).clamp(min=1e-12) / (2 ** (bits - 1) - 1)
        return torch.round(weight / scale).clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * scale
    low, high = weight.amin(1, keepdim=True).clamp(max=0), weight.amax(1, keepdim=True).clamp(min=0)
    scale = (high - low).clamp(min=1e-12) / (2 ** bits - 1)
    zero = torch.round(-low / scale)
    return (torch.clamp(torch.round(weight / scale) + zero, 0, 2 ** bits - 1) - zero) * scale


def measure_sensitivity(model: Any, token_ids: list[list[int]], ranges: dict[str, tuple[float, float]],
                        settings: StaticQDQ, on_group: Callable[[int, int], None] = lambda i, n: None) -> dict[str, float]:
    """{group key: mean KL (nats/token) of the model with only that group quantized}, measured on
    the calibration tokens joined and cut into PROBE_WINDOWS windows of PROBE_TOKENS."""
    import torch

    from edgelm.arch import for_model

    levels = 256 if settings.activation_dtype == "uint8" else 65536
    arch = for_model(model)
    linears = {path: module for path, module in arch.layer_linears(model).items() if path in ranges}
    groups: dict[str, list[str]] = {}
    for name in linears:
        groups.setdefault(group_key(name, arch), []).append(name)
    stream = [t for ids in token_ids for t in ids]
    windows = max(1, min(PROBE_WINDOWS, len(stream) // PROBE_TOKENS))
    length = min(PROBE_TOKENS, len(stream))
    batch = torch.tensor(stream[:windows * length]).reshape(windows, length)
    with torch.no_grad():
        reference = torch.log_softmax(model(batch, use_cache=False).logits.double(), -1)
        scores: dict[str, float] = {}
        for index, (key, names) in enumerate(groups.items()):
            handles = []
            for name in names:
                low, high = ranges[name]
                weight = _fake_quant_weight(linears[name].weight.float(), settings)

                def forward_hook(module, inputs, output, low=low, high=high, weight=weight):
                    x = _fake_quant_activation(inputs[0], low, high, levels)
                    return torch.nn.functional.linear(x, weight, module.bias)

                handles.append(linears[name].register_forward_hook(forward_hook))
            try:
                logp = torch.log_softmax(model(batch, use_cache=False).logits.double(), -1)
                scores[key] = float((reference.exp() * (reference - logp)).sum()) / (windows * length)
            finally:
                for handle in handles:
                    handle.remove()
            on_group(index + 1, len(groups))
    return scores


class MeasureSensitivity:
    name = "sensitivity"
    title = "Measure each MatMul group's int8 sensitivity (for mixed precision)"

    def run(self, state: BuildState, progress: Progress) -> SensitivityResult:
        settings = state.plan.profile.quantization
        skipped = scheme_for(settings).skip_reason(self.name, settings)
        if skipped:
            return SensitivityResult(skipped=skipped)
        token_ids = plan_token_ids(state)
        ranges = state.result(SmoothResult).activation_ranges  # the scheme asks for smooth's stats too
        scores = measure_sensitivity(state.model, token_ids, ranges, settings,
                                     on_group=lambda i, n: progress(self.name, i, n, f"group {i}/{n}"))
        from edgelm.arch import for_model

        arch = for_model(state.model)
        worst = sorted(scores.items(), key=lambda kv: -kv[1])[:8]
        return SensitivityResult(groups=len(scores), probe_tokens=min(PROBE_WINDOWS * PROBE_TOKENS, sum(map(len, token_ids))),
                                 most_sensitive={key: float(f"{kl:.3g}") for key, kl in worst},
                                 by_module={module: scores[group_key(module, arch)] for module in ranges
                                            if group_key(module, arch) in scores})
