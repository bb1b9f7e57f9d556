"""Perplexity, greedy top-1 agreement and KL divergence of a bundle against a reference,
both run through edgelm_runtime — the code apps run — on the same token windows."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from edgelm_runtime.scoring import log_softmax


def window_stats(logp_candidate: np.ndarray, logp_reference: np.ndarray, ids: Sequence[int]) -> tuple[float, float, int, float]:
    """Sums over one window's next-token positions: (candidate NLL, reference NLL, argmax matches, KL)."""
    rows, targets = np.arange(len(ids) - 1), np.asarray(ids[1:])
    return (float(-logp_candidate[rows, targets].sum()), float(-logp_reference[rows, targets].sum()),
            int((logp_candidate.argmax(-1) == logp_reference.argmax(-1)).sum()),
            float((np.exp(logp_reference) * (logp_reference - logp_candidate)).sum()))


def compare(candidate: Any, reference: Any, windows: Sequence[list[int]],
            on_window: Callable[[int], None] = lambda i: None) -> dict[str, float]:
    """`candidate`/`reference` expose logits(ids) -> (S, V). Next-token metrics over all windows."""
    nll_c, nll_r, agree, kl, count = 0.0, 0.0, 0, 0.0, 0
    for i, ids in enumerate(windows):
        stats = window_stats(log_softmax(candidate.logits(ids)[:-1]), log_softmax(reference.logits(ids)[:-1]), ids)
        nll_c, nll_r, agree, kl = nll_c + stats[0], nll_r + stats[1], agree + stats[2], kl + stats[3]
        count += len(ids) - 1
        on_window(i + 1)
    ppl, ref_ppl = float(np.exp(nll_c / count)), float(np.exp(nll_r / count))
    # unrounded: gates compare these exact values; tables round for people
    return {"perplexity": ppl, "reference_perplexity": ref_ppl, "perplexity_ratio": ppl / ref_ppl,
            "top1_agreement": agree / count, "kl_divergence": kl / count, "tokens": count}


# (gate field, metric key, label, format): a max_* gate fails above its value, a min_* gate below
PROSE_GATES = (("max_perplexity_ratio", "perplexity_ratio", "perplexity ratio", ".3f"),
               ("min_top1_agreement", "top1_agreement", "top-1 agreement", ".3f"),
               ("max_kl_divergence", "kl_divergence", "KL divergence", ".4g"))


def missed_gates(metrics: dict[str, float], gates: Any, table: Sequence[tuple[str, str, str, str]]) -> list[str]:
    """Human-readable list of the gates of `table` that `metrics` misses (empty: passes)."""
    failed = []
    for gate, key, label, fmt in table:
        limit = getattr(gates, gate)
        if limit is None:
            continue
        value = metrics[key]
        if (value > limit) if gate.startswith("max_") else (value < limit):
            failed.append(f"{label} {value:{fmt}} {'>' if gate.startswith('max_') else '<'} {limit}")
    return failed


def gate_failures(metrics: dict[str, float], gates: Any) -> list[str]:
    """The perplexity, top-1 and KL gates `metrics` misses."""
    return missed_gates(metrics, gates, PROSE_GATES)
