"""Automatic mixed precision: keep the fewest weight MatMuls in fp32 that meet the quality gates.

The graph is quantized once; a trial then restores chosen MatMuls to fp32 by rewiring them past
their QuantizeLinear/DequantizeLinear pairs (seconds), instead of re-running calibration and
quantization (a minute each). Candidates are grouped by the activation they read (q/k/v share
one) and ranked by their measured sensitivity (stages/compress/sensitivity.py: the KL each group causes when it
alone is quantized), or by the input's outlier ratio when none was measured; the search
finds the shortest ranked prefix that passes, by doubling and then bisection."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx

from edgelm.eval.metrics import window_stats
from edgelm.stages.export.fused import PACKED_INPUTS
from edgelm.stages.compress.sensitivity import group_key
from edgelm_runtime.scoring import log_softmax

logger = logging.getLogger(__name__)


def restore_float(quantized: onnx.ModelProto, float_weights: dict[str, onnx.TensorProto],
                  nodes: set[str]) -> onnx.ModelProto:
    """A copy of `quantized` in which the named MatMuls read float activations and weights."""
    model = copy.deepcopy(quantized)
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    present = {init.name for init in graph.initializer}
    for node in graph.node:
        if node.op_type != "MatMul" or node.name not in nodes:
            continue
        act_dq = producer.get(node.input[0])
        if act_dq is not None and act_dq.op_type == "DequantizeLinear":
            act_q = producer.get(act_dq.input[0])
            if act_q is not None and act_q.op_type == "QuantizeLinear":
                node.input[0] = act_q.input[0]
        weight_dq = producer.get(node.input[1])
        if weight_dq is not None and weight_dq.op_type == "DequantizeLinear":
            name = weight_dq.input[0].removesuffix("_quantized")
            if name not in float_weights:
                raise KeyError(f"no float weight {name} for {node.name}")
            node.input[1] = name
            if name not in present:
                graph.initializer.append(float_weights[name])
                present.add(name)
    _remove_dead(graph)
    return model


def _remove_dead(graph: onnx.GraphProto) -> None:
    """Drop nodes whose outputs nobody reads (the orphaned Q/DQ pairs), then unused initializers."""
    outputs = {o.name for o in graph.output}
    while True:
        used = outputs | {name for node in graph.node for name in node.input}
        dead = [node for node in graph.node if not any(out in used for out in node.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    used = {name for node in graph.node for name in node.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)


def unpacked(module: str) -> str:
    """The PyTorch module whose input a packed MatMul shares (statistics are measured there)."""
    for packed, first in PACKED_INPUTS.items():
        if module.endswith(packed):
            return module[: -len(packed)] + first
    return module


def ranked_groups(candidates: dict[str, str], score_of: dict[str, float], arch: Any = None) -> list[list[str]]:
    """MatMul node names grouped by shared input (q/k/v; `arch.sensitivity_group`, Llama-shaped by
    default), highest score (measured sensitivity, or the input's outlier ratio) first. A module
    measured under its own path (a family's own packed Linear, Phi-3) is scored as itself; a MatMul
    the export packed is scored by the module whose input it shares."""
    groups: dict[str, list[str]] = {}
    for node, module in candidates.items():
        groups.setdefault(group_key(module, arch), []).append(node)

    def measured(module: str) -> float:
        return score_of[module] if module in score_of else score_of.get(unpacked(module), 0.0)

    score = lambda key: max(measured(m) for n, m in candidates.items() if n in groups[key])  # noqa: E731
    return [groups[key] for key in sorted(groups, key=score, reverse=True)]


class WindowMetrics:
    """Perplexity ratio, top-1 agreement and KL of a candidate graph against fixed reference
    log-probabilities (computed once), on the same token windows as the quality check."""

    def __init__(self, reference_logits: Callable[[list[int]], np.ndarray], windows: Sequence[list[int]]) -> None:
        self.windows = [list(w) for w in windows]
        self._ref = [log_softmax(reference_logits(w)[:-1]).astype(np.float32) for w in self.windows]

    def measure(self, logits: Callable[[list[int]], np.ndarray]) -> dict[str, float]:
        nll_c, nll_r, agree, kl, count = 0.0, 0.0, 0, 0.0, 0
        for ref, ids in zip(self._ref, self.windows):
            stats = window_stats(log_softmax(logits(ids)[:-1]), ref.astype(np.float64), ids)
            nll_c, nll_r, agree, kl = nll_c + stats[0], nll_r + stats[1], agree + stats[2], kl + stats[3]
            count += len(ids) - 1
        return {"perplexity_ratio": float(np.exp((nll_c - nll_r) / count)),
                "top1_agreement": agree / count, "kl_divergence": kl / count}


def search_prefix(passes: Callable[[int], bool], size: int) -> int | None:
    """Smallest k in [0, size] with passes(k), assuming passing is monotonic in k."""
    if passes(0):
        return 0
    low, high = 0, 1
    while not passes(high):
        low = high
        if high == size:
            return None
        high = min(high * 2, size)
    while high - low > 1:
        middle = (low + high) // 2
        if passes(middle):
            high = middle
        else:
            low = middle
    return high
