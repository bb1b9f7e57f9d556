"""Perplexity, greedy top-1 agreement and KL divergence of a bundle against a reference,
both run through edgelm_runtime — the code apps run — on the same token windows."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from edgelm_runtime.scoring import log_softmax


def compare(candidate: Any, reference: Any, windows: Sequence[list[int]],
            on_window: Callable[[int], None] = lambda i: None) -> dict[str, float]:
    """`candidate`/`reference` expose logits(ids) -> (S, V). Next-token metrics over all windows."""
    nll_c, nll_r, agree, kl, count = 0.0, 0.0, 0, 0.0, 0
    for i, ids in enumerate(windows):
        targets = np.asarray(ids[1:])
        logp_c = log_softmax(candidate.logits(ids)[:-1])
        logp_r = log_softmax(reference.logits(ids)[:-1])
        rows = np.arange(len(targets))
        nll_c -= logp_c[rows, targets].sum()
        nll_r -= logp_r[rows, targets].sum()
        agree += int((logp_c.argmax(-1) == logp_r.argmax(-1)).sum())
        kl += float((np.exp(logp_r) * (logp_r - logp_c)).sum())
        count += len(targets)
        on_window(i + 1)
    ppl, ref_ppl = float(np.exp(nll_c / count)), float(np.exp(nll_r / count))
    # unrounded: gates compare these exact values; tables round for people
    return {"perplexity": ppl, "reference_perplexity": ref_ppl, "perplexity_ratio": ppl / ref_ppl,
            "top1_agreement": agree / count, "kl_divergence": kl / count, "tokens": count}
