"""Prune the model before export. Structured: whole MLP channels, whole KV groups (a KV head with
its query heads) and whole layers, so the matrices really shrink and the bundle gets smaller and
faster. Unstructured / 2:4: zeros inside dense matrices (smaller once compressed, no faster on
onnxruntime's CPU kernels, which have no sparse path).

Importance is measured on calibration text, not read off the weights: a group's score is the
energy it adds to its layer's output, ||W_group X_group||_F — for one MLP channel exactly
||W_down[:, j]|| * ||h_j||, for a KV group a quadratic form of the output projection's input Gram
matrix, for one weight Wanda's |W_ij| * ||X_j||. Module paths, packed projections (Phi-3) and
per-layer config lists come from the family's arch (edgelm.arch). Hand-written:
torch.nn.utils.prune only masks (nothing shrinks), and no field library prunes a Hugging Face
decoder structurally so that it still exports. The kept channel counts are multiples of 32, the
block MatMulNBits quantizes along its inputs."""

from __future__ import annotations

import copy
import logging
import math
from typing import Any

from edgelm.arch import for_model, shrink_linear
from edgelm.config.recipe import PruneSettings
from edgelm.errors import ConfigError
from edgelm.pipeline.results import PruneResult
from edgelm.pipeline.stage import BuildState, Progress
from edgelm.calibration import calibration_token_ids, observe_linear_inputs

logger = logging.getLogger(__name__)
CHANNEL_MULTIPLE = 32  # MLP channels kept per layer: a multiple of the int8/int4 block along K


def check_prune_fits(settings: PruneSettings, config: Any, where: str = "prune") -> None:
    """Refuse what would leave nothing: every layer dropped, every KV group removed, an index past
    the last layer, a KV fraction that removes no group at all."""
    layers = config.num_hidden_layers
    outside = [i for i in settings.drop_layers if i >= layers]
    if outside:
        raise ConfigError(f"{where}.drop_layers: layer {outside[0]} does not exist (the model has {layers}: 0-{layers - 1})",
                          hint="list layer indices from 0")
    if len(settings.drop_layers) >= layers:
        raise ConfigError(f"{where}.drop_layers: dropping all {layers} layers leaves no model",
                          hint="keep at least one layer")
    if settings.kv_groups_fraction:
        kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        removed = round(settings.kv_groups_fraction * kv)
        if removed >= kv:
            raise ConfigError(f"{where}.kv_groups_fraction: {settings.kv_groups_fraction} of {kv} KV groups removes all of them",
                              hint=f"use at most {(kv - 1) / kv:.2f} (keeps one group)")
        if removed == 0:
            raise ConfigError(f"{where}.kv_groups_fraction: {settings.kv_groups_fraction} of {kv} KV groups removes none",
                              hint=f"use at least {0.5 / kv:.2f} to remove one group, or 0")


def parameter_count(model: Any, nonzero: bool = False) -> int:
    import torch

    if nonzero:
        return int(sum(int(torch.count_nonzero(p)) for p in model.parameters()))
    return int(sum(p.numel() for p in model.parameters()))


def collect_scores(model: Any, token_ids: list[list[int]], on_sample=lambda i: None) -> dict[str, Any]:
    """Per Linear of every layer (module path): the sum of squares of each input channel over the
    calibration tokens; per output projection also the Gram matrix of each KV group's input columns."""
    import torch

    arch = for_model(model)
    heads, kv_heads, head_dim = arch.config_attention(model.config)
    group_width = (heads // kv_heads) * head_dim
    outputs = {arch.module_path(i, "o") for i in range(len(arch.layers(model)))}
    stats: dict[str, Any] = {}

    def observe(name: str, x: Any) -> None:
        entry = stats.setdefault(name, {"sumsq": torch.zeros(x.shape[-1]), "sum": torch.zeros(x.shape[-1]), "count": 0})
        entry["sumsq"] += (x * x).sum(0)
        entry["sum"] += x.sum(0)
        entry["count"] += x.shape[0]
        if name in outputs:
            groups = x.reshape(x.shape[0], -1, group_width).transpose(0, 1)  # (groups, tokens, width)
            entry["gram"] = entry.get("gram", 0) + groups.transpose(1, 2) @ groups

    observe_linear_inputs(model, token_ids, observe, on_sample)
    return stats


def _energy(entry: dict[str, Any], compensate: bool) -> Any:
    """Per input channel, sum over tokens of x^2; with compensation of (x - mean)^2 (the mean part
    of a removed channel is put back as a bias, so only its fluctuation is lost)."""
    if not compensate:
        return entry["sumsq"]
    return (entry["sumsq"] - entry["sum"] ** 2 / max(entry["count"], 1)).clamp(min=0)


def _channel_scores(arch: Any, layer: Any, index: int, config: Any, stats: dict[str, Any] | None,
                    compensate: bool) -> Any:
    """Importance of each MLP intermediate channel: ||W_down[:, j]|| * ||h_j|| (wanda: exactly the
    Frobenius norm of the channel's contribution to the down projection's output; with compensation,
    of its fluctuation around the mean), or with the weights alone ||W_down[:, j]|| * ||W_up[j, :]||."""
    column = arch.role(layer, "down", config).weight.norm(dim=0)
    if stats is None:
        return column * arch.role(layer, "up", config).weight.norm(dim=1)
    return column * _energy(stats[arch.module_path(index, "down")], compensate).sqrt()


def _compensated(linear: Any, removed: Any, mean: Any, kept: Any) -> Any:
    """`linear` keeping only input columns `kept`, with the removed columns' output at the
    calibration mean folded into its bias (FLAP's bias compensation)."""
    import torch

    out = shrink_linear(linear, columns=kept)
    shift = linear.weight.data[:, removed] @ mean[removed]
    if out.bias is None:
        out.bias = torch.nn.Parameter(shift.clone(), requires_grad=False)
    else:
        out.bias.data += shift
    return out


def _keep_count(size: int, fraction: float) -> int:
    kept = round(size * (1 - fraction) / CHANNEL_MULTIPLE) * CHANNEL_MULTIPLE
    return min(size, max(CHANNEL_MULTIPLE, kept))


def prune_mlp_channels(model: Any, fraction: float, stats: dict[str, Any] | None, allocation: str,
                       compensate: bool = False) -> list[int]:
    """Remove the least important intermediate channels of every MLP; returns the kept counts.
    uniform: the same count per layer; global: scores normalised by each layer's mean, ranked
    across layers, so layers whose channels matter more keep more (at least 32 channels each).
    compensate (needs stats): the removed channels' mean contribution becomes the down projection's
    bias. Gate and up keep the same rows (packed in one Linear on Phi-3: both halves shrink alike)."""
    import torch

    arch, config = for_model(model), model.config
    layers = arch.layers(model)
    compensate = compensate and stats is not None
    scores = [_channel_scores(arch, layer, i, config, stats, compensate) for i, layer in enumerate(layers)]
    sizes = [len(s) for s in scores]
    if allocation == "uniform":
        keep = [_keep_count(size, fraction) for size in sizes]
    else:
        normalised = torch.cat([s / s.mean().clamp(min=1e-12) for s in scores])
        budget = sum(sizes) - round(fraction * sum(sizes))
        threshold = normalised.sort(descending=True).values[min(budget, len(normalised)) - 1]
        keep = [min(size, max(CHANNEL_MULTIPLE, round(int((s / s.mean().clamp(min=1e-12) >= threshold).sum())
                                                     / CHANNEL_MULTIPLE) * CHANNEL_MULTIPLE))
                for s, size in zip(scores, sizes)]
    with torch.no_grad():
        for index, (layer, score, count) in enumerate(zip(layers, scores, keep)):
            if count == len(score):
                continue
            kept = score.topk(count).indices.sort().values
            down = arch.role(layer, "down", config)
            arch.keep_rows(layer, {"gate": kept, "up": kept}, config)
            if compensate:
                entry = stats[arch.module_path(index, "down")]
                removed = torch.ones(len(score), dtype=torch.bool)
                removed[kept] = False
                arch.set_linear(layer, down.path, _compensated(down.linear, removed, entry["sum"] / entry["count"], kept))
            else:
                arch.keep_columns(layer, "down", kept)
    model.config.intermediate_size = max(keep)  # the per-layer sizes are the modules' own
    return keep


def prune_kv_groups(model: Any, fraction: float, stats: dict[str, Any] | None, compensate: bool = False) -> int:
    """Remove the same number of KV groups (a KV head and the query heads that read it) from every
    layer: the bundle's KV layout and GroupQueryAttention take one head count for all layers, so
    the count is uniform; which groups go is each layer's own choice. Query, key and value keep
    their chosen rows (row ranges of one packed Linear on Phi-3), the output projection the query
    columns. Returns the KV heads kept."""
    import torch

    arch, config = for_model(model), model.config
    heads, kv_heads, head_dim = arch.config_attention(config)
    groups = heads // kv_heads
    kept_kv = kv_heads - round(fraction * kv_heads)
    layers = arch.layers(model)
    with torch.no_grad():
        for i, layer in enumerate(layers):
            output = arch.role(layer, "o", config)
            width = groups * head_dim
            w_o = output.weight.reshape(output.weight.shape[0], kv_heads, width).transpose(0, 1)  # (kv, out, width)
            if stats is None:
                score = w_o.norm(dim=(1, 2))
            else:  # ||W_g X_g||_F^2 = sum((W_g^T W_g) * (X_g^T X_g)); compensated: X_g centred
                entry = stats[arch.module_path(i, "o")]
                gram = entry["gram"]
                if compensate and stats is not None:
                    mean = (entry["sum"] / entry["count"]).reshape(kv_heads, width)
                    gram = gram - entry["count"] * mean[:, :, None] * mean[:, None, :]
                score = ((w_o.transpose(1, 2) @ w_o) * gram).sum(dim=(1, 2)).clamp(min=0).sqrt()
            chosen = score.topk(kept_kv).indices.sort().values
            kv_rows = torch.cat([torch.arange(g * head_dim, (g + 1) * head_dim) for g in chosen.tolist()])
            q_rows = torch.cat([torch.arange(g * width, (g + 1) * width) for g in chosen.tolist()])
            arch.keep_rows(layer, {"q": q_rows, "k": kv_rows, "v": kv_rows}, config)
            if compensate and stats is not None:
                entry = stats[arch.module_path(i, "o")]
                removed = torch.ones(output.weight.shape[1], dtype=torch.bool)
                removed[q_rows] = False
                arch.set_linear(layer, output.path, _compensated(output.linear, removed, entry["sum"] / entry["count"], q_rows))
            else:
                arch.keep_columns(layer, "o", q_rows)
    for layer in layers:
        arch.set_attention_heads(layer, kept_kv * groups, kept_kv)
    config.head_dim = head_dim  # no longer hidden_size // num_attention_heads
    config.num_key_value_heads, config.num_attention_heads = kept_kv, kept_kv * groups
    return kept_kv


def drop_layers(model: Any, indices: tuple[int, ...]) -> None:
    """Remove whole decoder layers; the rest are renumbered (the KV cache is indexed by layer) and
    the config's per-layer lists (layer types, SmolLM3's NoPE flags) trimmed alike, by the arch."""
    arch = for_model(model)
    arch.set_layers(model, [i for i in range(len(arch.layers(model))) if i not in set(indices)])


def sparsify(model: Any, kind: str, sparsity: float, stats: dict[str, Any] | None) -> float:
    """Zero weights of every decoder Linear in place: per output row the lowest-scoring `sparsity`
    fraction (unstructured), or 2 of every 4 consecutive inputs (2:4). Score |W_ij| * ||X_j||
    (wanda) or |W_ij|. Returns the fraction of those weights now zero."""
    import torch

    zeros = total = 0
    with torch.no_grad():
        for name, module in for_model(model).layer_linears(model).items():
            weight = module.weight
            score = weight.abs()
            if stats is not None:
                score = score * stats[name]["sumsq"].sqrt()[None, :]
            if kind == "2:4":
                blocks = score.reshape(weight.shape[0], -1, 4)
                drop = blocks.topk(2, dim=-1, largest=False).indices
                mask = torch.ones_like(blocks, dtype=torch.bool).scatter_(-1, drop, False).reshape(weight.shape)
            else:
                count = int(weight.shape[1] * sparsity)
                drop = score.topk(count, dim=1, largest=False).indices if count else None
                mask = torch.ones_like(weight, dtype=torch.bool)
                if drop is not None:
                    mask.scatter_(1, drop, False)
            weight.mul_(mask)
            zeros, total = zeros + int((~mask).sum()), total + mask.numel()
    return zeros / max(total, 1)


def perplexity(model: Any, windows: list[list[int]]) -> float:
    """PyTorch fp32 perplexity over the held-out windows (the quality check's windows)."""
    import torch

    nll, count = 0.0, 0
    with torch.no_grad():
        for ids in windows:
            logits = model(torch.tensor([ids]), use_cache=False).logits[0, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum"))
            count += len(ids) - 1
    return math.exp(nll / count)


class Prune:
    name = "prune"
    title = "Prune (structured channels / KV groups / layers, or sparsity) and recover"

    def run(self, state: BuildState, progress: Progress) -> PruneResult:
        from edgelm.eval.text import eval_windows

        settings = state.plan.prune
        if settings is None:
            return PruneResult(skipped="no prune section")
        model = state.model
        check_prune_fits(settings, model.config)
        quality = state.plan.quality
        windows = eval_windows(quality.eval_text, quality.windows, min(quality.window_len, state.max_seq_len),
                               lambda text: state.tokenizer(text, add_special_tokens=False)["input_ids"])
        progress(self.name, 0, None, "perplexity before pruning")
        before = {"parameters": parameter_count(model), "layers": model.config.num_hidden_layers,
                  "kv_heads": for_model(model).config_attention(model.config)[1], "perplexity": perplexity(model, windows)}
        teacher = copy.deepcopy(model).eval() if settings.recover else None
        if settings.drop_layers:
            drop_layers(model, settings.drop_layers)
        stats = None
        if settings.importance == "wanda":
            calibration = state.plan.calibration
            token_ids = calibration_token_ids(calibration.source, state.tokenizer, state.chat_template, settings.samples,
                                              calibration.max_prompt_tokens)
            stats = collect_scores(model, token_ids, lambda i: progress(self.name, i, len(token_ids),
                                                                        f"importance on calibration text {i}/{len(token_ids)}"))
        facts: dict[str, Any] = {"kind": settings.kind, "importance": settings.importance}
        if settings.kind == "structured":
            if settings.kv_groups_fraction:
                facts["kv_heads"] = prune_kv_groups(model, settings.kv_groups_fraction, stats, settings.compensate)
            if settings.mlp_fraction:
                facts["mlp_channels"] = prune_mlp_channels(model, settings.mlp_fraction, stats, settings.allocation,
                                                           settings.compensate)
                facts["allocation"] = settings.allocation
            facts["compensated"] = settings.compensate and stats is not None
            facts["dropped_layers"] = list(settings.drop_layers)
        else:
            facts["zeroed_fraction"] = round(sparsify(model, settings.kind, settings.sparsity, stats), 4)
        pruned_ppl = perplexity(model, windows)
        facts.update({"params_before": before["parameters"], "params_after": parameter_count(model),
                      "nonzero_params_after": parameter_count(model, nonzero=True),
                      "layers": model.config.num_hidden_layers, "perplexity_before": round(before["perplexity"], 3),
                      "perplexity_pruned": round(pruned_ppl, 3)})
        if teacher is not None:
            from edgelm.stages.compress.recover import distill

            recovery = distill(model, teacher, state, settings.recover, progress)
            del teacher
            recovery["perplexity_after"] = round(perplexity(model, windows), 3)
            facts["recovery"] = recovery
        final = facts["recovery"]["perplexity_after"] if "recovery" in facts else pruned_ppl
        facts["perplexity_ratio_vs_unpruned"] = round(final / before["perplexity"], 4)
        state.source = {**state.source, "parameters": facts["params_after"]}
        return PruneResult(**facts)
