"""SmoothQuant: move activation outliers into the weights before export, so 8-bit activations fit.

For each Linear input channel j, s_j = max|X_j|^alpha / max|W_j|^(1-alpha); X is divided by s
(folded into the producer the family's arch names: a norm's weight, with Gemma's (1 + w) offset;
the up projection's rows for the down projection; the value rows for the output projection) and W
multiplied by it. Packed Linears (Phi-3) work unchanged: a role is a row range of one Linear. The
fp32 model computes the same function (parity is still checked after export); only the ranges
that int8 must cover change. Hand-written: no field library applies SmoothQuant to a PyTorch
decoder before ONNX export (onnxruntime's own SmoothQuant needs neural-compressor).

Also records each Linear's input outlier ratio (max|X| / rms X), which ranks layers for mixed
precision."""

from __future__ import annotations

import logging
from typing import Any

from edgelm.errors import StageError
from edgelm.pipeline.results import SmoothResult
from edgelm.pipeline.stage import BuildState, Progress
from edgelm.quant import scheme_for
from edgelm.calibration import observe_linear_inputs, plan_token_ids

logger = logging.getLogger(__name__)


def collect_input_stats(model: Any, token_ids: list[list[int]], on_sample=lambda i: None) -> dict[str, dict[str, Any]]:
    """Per Linear (by module path): channel-wise max|X|, the input's min/max and its outlier ratio."""
    import torch

    stats: dict[str, dict[str, Any]] = {}

    def observe(name: str, x: Any) -> None:
        entry = stats.setdefault(name, {"absmax": torch.zeros(x.shape[-1]), "sumsq": 0.0, "count": 0,
                                        "min": float("inf"), "max": float("-inf")})
        entry["absmax"] = torch.maximum(entry["absmax"], x.abs().amax(0))
        entry["min"], entry["max"] = min(entry["min"], float(x.min())), max(entry["max"], float(x.max()))
        entry["sumsq"] += float((x * x).sum())
        entry["count"] += x.numel()

    observe_linear_inputs(model, token_ids, observe, on_sample)
    for entry in stats.values():
        rms = (entry["sumsq"] / max(entry["count"], 1)) ** 0.5
        entry["outlier_ratio"] = float(entry["absmax"].max()) / max(rms, 1e-12)
    return stats


def _scales(act_max: Any, weights: list[Any], alpha: float) -> Any:
    import torch

    weight_max = torch.stack([w.abs().amax(0) for w in weights]).amax(0)
    scales = act_max.clamp(min=1e-5).pow(alpha) / weight_max.clamp(min=1e-5).pow(1 - alpha)
    return scales.clamp(min=1e-5)


def smooth_model(model: Any, stats: dict[str, dict[str, Any]], alpha: float) -> dict[str, Any]:
    """Apply SmoothQuant in place to every decoder layer, through the family's arch: each input
    group's scale folds where `input_groups` says; a group without a fold is left as it is, its
    reason recorded. Returns {"smoothed_linears": count, "skipped": {group key: reason}}."""
    import torch

    from edgelm.arch import NormFold, for_model

    arch, config = for_model(model), model.config
    heads, kv_heads, head_dim = arch.config_attention(config)
    smoothed, skipped = 0, {}
    with torch.no_grad():
        for i, layer in enumerate(arch.layers(model)):
            for group in arch.input_groups(layer, i, config):
                if group.fold is None:
                    skipped[group.key] = group.reason or "no producer to fold the scale into"
                    continue
                s = _scales(stats[group.key]["absmax"], [linear.weight for linear in group.readers], alpha)
                if isinstance(group.fold, NormFold):
                    group.fold.divide(s)
                else:  # a producer's output rows
                    group.fold.divide_rows(s)
                for linear in group.readers:
                    linear.weight.mul_(s)
                smoothed += len(group.readers)
            # the output projection reads softmax(QK)V: the scale moves into the value rows, one
            # per KV channel, so every query head of a GQA group must share it (max over the group)
            value, output = arch.role(layer, "v", config), arch.role(layer, "o", config)
            act = stats[arch.module_path(i, "o")]["absmax"].reshape(kv_heads, heads // kv_heads, head_dim)
            wmax = output.weight.abs().amax(0).reshape(kv_heads, heads // kv_heads, head_dim)
            s_kv = act.amax(1).clamp(min=1e-5).pow(alpha) / wmax.amax(1).clamp(min=1e-5).pow(1 - alpha)
            s_kv = s_kv.clamp(min=1e-5).reshape(-1)
            value.divide_rows(s_kv)
            s_o = s_kv.reshape(kv_heads, 1, head_dim).expand(kv_heads, heads // kv_heads, head_dim).reshape(-1)
            output.linear.weight.mul_(s_o)
            smoothed += 2
    return {"smoothed_linears": smoothed, "skipped": skipped}


class Smooth:
    name = "smooth"
    title = "SmoothQuant: migrate activation outliers into weights"

    def run(self, state: BuildState, progress: Progress) -> SmoothResult:
        settings = state.plan.profile.quantization
        skipped = scheme_for(settings).skip_reason(self.name, settings)
        if skipped:
            return SmoothResult(skipped=skipped)
        token_ids = plan_token_ids(state)
        report = lambda i: progress(self.name, i, len(token_ids), f"activation stats {i}/{len(token_ids)}")  # noqa: E731
        stats = collect_input_stats(state.model, token_ids, report)
        facts: dict[str, Any] = {"max_outlier_ratio_before": round(max(e["outlier_ratio"] for e in stats.values()), 1)}
        if settings.smoothquant_alpha is not None:
            try:
                result = smooth_model(state.model, stats, settings.smoothquant_alpha)
            except (KeyError, AttributeError) as exc:
                from edgelm.arch import for_model

                raise StageError(self.name, f"{for_model(state.model).name}: this model's layers do not have the shape "
                                 f"its family's arch describes, so SmoothQuant cannot fold its scales ({exc})",
                                 hint="set quantization.smoothquant_alpha: null in the profile") from exc
            stats = collect_input_stats(state.model, token_ids, report)
            facts.update({"alpha": settings.smoothquant_alpha, "smoothed_linears": result["smoothed_linears"],
                          "max_outlier_ratio_after": round(max(e["outlier_ratio"] for e in stats.values()), 1)})
            if result["skipped"]:
                facts["unsmoothed_inputs"] = result["skipped"]
        # ranks the weight MatMuls for mixed precision: the most outlier-heavy inputs suffer most from 8 bits
        ratios = {name: entry["outlier_ratio"] for name, entry in stats.items()}
        worst = sorted(ratios.items(), key=lambda kv: -kv[1])[:5]
        return SmoothResult(**facts, worst_inputs={name: round(ratio, 1) for name, ratio in worst}, outlier_ratios=ratios,
                            activation_ranges={name: (entry["min"], entry["max"]) for name, entry in stats.items()})
