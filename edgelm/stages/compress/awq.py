"""Activation-aware weight scaling (AWQ) before weight-only quantization.

Input channels that carry large activations matter most; scaling their weight columns up by s
(and the activations down by 1/s, folded into the producer the family's arch names: a norm's
weight, or the up projection's rows for the down projection) gives them finer 4-bit steps. The
fp32 model computes the same function; a group the arch gives no fold is left unscaled, its
reason recorded in the facts.
Per group of Linears that read one input, s = mean|X|^alpha with alpha searched on calibration
activations to minimise the quantized output error — the search of Lin et al. (AWQ, 2023),
hand-written because onnxruntime ships AWQ only for NVIDIA's modelopt (GPU) and the other field
libraries apply it to PyTorch checkpoints, not before an ONNX export."""

from __future__ import annotations

import logging
from typing import Any

from edgelm.pipeline.results import AwqResult
from edgelm.pipeline.stage import BuildState, Progress
from edgelm.quant import scheme_for
from edgelm.calibration import plan_token_ids

logger = logging.getLogger(__name__)

ALPHAS = tuple(i / 10 for i in range(11))
ROWS_PER_INPUT = 512  # activation rows kept per input for the search: enough to rank 11 alphas


def fake_quant_blocks(weight: Any, bits: int, block: int) -> Any:
    """Asymmetric round-to-nearest in blocks of `block` input channels (MatMulNBits' layout)."""
    import torch

    rows, cols = weight.shape
    pad = (-cols) % block
    w = torch.nn.functional.pad(weight, (0, pad)).reshape(rows, -1, block)
    low, high = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    scale = (high - low).clamp(min=1e-10) / (2 ** bits - 1)
    q = torch.clamp(torch.round((w - low) / scale), 0, 2 ** bits - 1)
    return (q * scale + low).reshape(rows, -1)[:, :cols]


def collect_inputs(model: Any, token_ids: list[list[int]], names: set[str]) -> dict[str, Any]:
    """Up to ROWS_PER_INPUT rows of each named Linear's input (its `DecoderArch.layer_linears` path)."""
    import torch

    from edgelm.arch import for_model

    rows: dict[str, list[Any]] = {name: [] for name in names}
    hooks = []
    for key, module in for_model(model).layer_linears(model).items():
        if key in names:
            hooks.append(module.register_forward_pre_hook(
                lambda module, inputs, key=key: rows[key].append(inputs[0].detach().reshape(-1, inputs[0].shape[-1]))))
    try:
        with torch.no_grad():
            for ids in token_ids:
                model(torch.tensor([ids]), use_cache=False)
    finally:
        for handle in hooks:
            handle.remove()
    generator = torch.Generator().manual_seed(0)
    sampled = {}
    for key, parts in rows.items():
        x = torch.cat(parts).float()
        sampled[key] = x[torch.randperm(len(x), generator=generator)[:ROWS_PER_INPUT]]
    return sampled


def search_scales(x: Any, weights: list[Any], bits: int, block: int) -> tuple[Any, float, float, float]:
    """(scales, alpha, relative error at that alpha, relative error unscaled) minimising
    sum ||Q(W s)(x / s) - W x||^2 over ALPHAS (alpha 0 is s = 1: plain round to nearest)."""
    import torch

    reference = [x @ w.T for w in weights]
    norm = sum(float((r * r).sum()) for r in reference)
    magnitude = x.abs().mean(0).clamp(min=1e-6)
    best = (torch.ones_like(magnitude), 0.0, float("inf"))
    baseline = float("inf")
    for alpha in ALPHAS:
        s = magnitude.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        error = sum(float(((x / s) @ fake_quant_blocks(w * s, bits, block).T - r).pow(2).sum())
                    for w, r in zip(weights, reference))
        if alpha == 0:
            baseline = error
        if error < best[2]:
            best = (s, alpha, error)
    return best[0], best[1], best[2] / max(norm, 1e-12), baseline / max(norm, 1e-12)


def apply_awq(model: Any, token_ids: list[list[int]], bits: int, block: int,
              on_layer: Any = lambda i, n: None) -> dict[str, Any]:
    """Scale every decoder layer in place, one input group at a time (the attention input and the
    MLP input via their norms, the down projection's input via the up rows), as the arch folds them."""
    import torch

    from edgelm.arch import NormFold, for_model

    arch, config = for_model(model), model.config
    layers = arch.layers(model)
    plans = [arch.input_groups(layer, i, config) for i, layer in enumerate(layers)]
    inputs = collect_inputs(model, token_ids, {group.key for groups in plans for group in groups if group.fold is not None})
    alphas, errors_before, errors_after, skipped = [], [], [], {}
    with torch.no_grad():
        for i, groups in enumerate(plans):
            for group in groups:
                if group.fold is None:
                    skipped[group.key] = group.reason or "no producer to fold the scale into"
                    continue
                weights = [linear.weight.float() for linear in group.readers]
                s, alpha, after, before = search_scales(inputs[group.key], weights, bits, block)
                for linear in group.readers:
                    linear.weight.mul_(s)
                if isinstance(group.fold, NormFold):
                    group.fold.divide(s)
                else:  # a producer's output rows
                    group.fold.divide_rows(s)
                alphas.append(alpha)
                errors_before.append(before)
                errors_after.append(after)
            on_layer(i + 1, len(layers))
    if not alphas:
        return {"groups": 0, "unscaled_inputs": skipped}
    facts = {"groups": len(alphas), "mean_alpha": round(sum(alphas) / len(alphas), 3),
             "mean_relative_error_before": float(f"{sum(errors_before) / len(errors_before):.4g}"),
             "mean_relative_error_after": float(f"{sum(errors_after) / len(errors_after):.4g}")}
    if skipped:
        facts["unscaled_inputs"] = skipped
    return facts


class ActivationAwareScales:
    name = "awq"
    title = "Activation-aware weight scaling (AWQ) for weight-only int4"

    def run(self, state: BuildState, progress: Progress) -> AwqResult:
        settings = state.plan.profile.quantization
        skipped = scheme_for(settings).skip_reason(self.name, settings)
        if skipped:
            return AwqResult(skipped=skipped)
        token_ids = plan_token_ids(state)
        try:
            return AwqResult(**apply_awq(state.model, token_ids, settings.bits, settings.block_size,
                                         on_layer=lambda i, n: progress(self.name, i, n, f"layer {i}/{n}")))
        except (KeyError, AttributeError) as exc:
            from edgelm.arch import for_model
            from edgelm.errors import StageError

            raise StageError(self.name, f"{for_model(state.model).name}: this model's layers do not have the shape "
                             f"its family's arch describes, so AWQ cannot fold its scales ({exc})",
                             hint="set quantization.activation_aware: false in the profile") from exc
