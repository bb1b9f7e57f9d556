"""Chat fidelity: does the bundle still give the reference model's answers?

Per-token agreement on prose hides what a user sees: 0.958 top-1 agreement compounds to about a
quarter of 32-token answers unchanged. So each held-out chat prompt (chat_data.py) is rendered
with the bundle's own chat template and answered greedily by both models, and measured:

- `identical`: the share of answers whose first `tokens` tokens are the reference's (both
  ending at eos at the same place counts as identical);
- `mean_prefix`: the common prefix as a share of the reference answer, averaged;
- `first_token`: the share of answers that start with the reference's token;
- on the reference answer's positions, teacher-forced: KL(reference || bundle) mean, p99 and
  max, `same_top1` (llama.cpp's "same top p") and `rms_delta_p` (the RMS of the change in the
  probability of the reference's token), llama.cpp's perplexity-tool statistics."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from edgelm_runtime.scoring import log_softmax

CHAT_KEYS = ("identical", "mean_prefix", "first_token", "kl_mean", "kl_p99", "kl_max", "same_top1", "rms_delta_p")


def greedy_answer(model: Any, prompt_ids: Sequence[int], tokens: int) -> tuple[list[int], bool]:
    """(the first `tokens` greedy tokens, whether the answer ended at eos before them)."""
    if hasattr(model, "generate_tokens"):  # a bundle: the runtime's own loop on the KV cache
        from edgelm_runtime.sampling import SamplingParams

        answer = list(model.generate_tokens(prompt_ids, tokens, SamplingParams()))
        return answer, model.last_stats.finish_reason == "eos"
    return model.greedy(prompt_ids, tokens)


def fitting_prompts(prompts: Sequence[str], render: Callable[[str], list[int]], count: int,
                    limit: int) -> list[list[int]]:
    """The token ids of the first `count` prompts whose chat prompt fits in `limit` tokens."""
    chosen = []
    for prompt in prompts:
        ids = render(prompt)
        if len(ids) <= limit:
            chosen.append(ids)
            if len(chosen) == count:
                break
    return chosen


def held_out_prompt_ids(bundle: Any, count: int, tokens: int) -> list[list[int]]:
    """The first `count` held-out chat prompts, each one user turn rendered by the bundle's own
    chat template, that leave `tokens` tokens of its context for the answer."""
    from edgelm.eval.chat_data import held_out_chat_prompts

    def render(prompt: str) -> list[int]:
        text = bundle.render_chat([{"role": "user", "content": prompt}])
        return bundle.tokenizer.encode(text, add_special_tokens=False)  # the template writes the specials

    return fitting_prompts(held_out_chat_prompts(), render, count, bundle.manifest.max_seq_len - tokens)


def chat_fidelity(candidate: Any, reference: Any, prompt_ids: Sequence[list[int]], tokens: int,
                  on_prompt: Callable[[int], None] = lambda i: None) -> dict[str, Any]:
    """The metrics above for `candidate` against `reference` (both expose logits(ids); bundles
    generate_tokens, PyTorch models greedy) on the rendered prompts."""
    identical = prefix = first = 0.0
    kl: list[np.ndarray] = []
    same = delta = positions = 0.0
    for i, ids in enumerate(prompt_ids):
        ref, ref_ended = greedy_answer(reference, ids, tokens)
        got, got_ended = greedy_answer(candidate, ids, tokens)
        identical += float(got == ref and got_ended == ref_ended)
        common = next((k for k, (a, b) in enumerate(zip(got, ref)) if a != b), min(len(got), len(ref)))
        prefix += common / len(ref) if ref else float(not got)
        first += float(got[:1] == ref[:1])
        if ref:  # teacher-forced on the reference answer: the distributions at each of its positions
            whole = [*ids, *ref]
            rows = slice(len(ids) - 1, len(whole) - 1)
            lp_ref = log_softmax(reference.logits(whole)[rows])
            lp_got = log_softmax(candidate.logits(whole)[rows])
            kl.append((np.exp(lp_ref) * (lp_ref - lp_got)).sum(-1))
            same += float((lp_ref.argmax(-1) == lp_got.argmax(-1)).sum())
            at = np.arange(len(ref))
            delta += float(((np.exp(lp_got[at, ref]) - np.exp(lp_ref[at, ref])) ** 2).sum())
            positions += len(ref)
        on_prompt(i + 1)
    n = max(1, len(prompt_ids))
    divergences = np.concatenate(kl) if kl else np.zeros(1)
    return {"prompts": len(prompt_ids), "tokens": tokens, "identical": identical / n, "mean_prefix": prefix / n,
            "first_token": first / n, "kl_mean": float(divergences.mean()),
            "kl_p99": float(np.percentile(divergences, 99)), "kl_max": float(divergences.max()),
            "same_top1": same / max(1.0, positions), "rms_delta_p": float(np.sqrt(delta / max(1.0, positions)))}


CHAT_GATES = (("min_chat_identical", "identical", "chat answers identical", ".3f"),
              ("min_chat_prefix", "mean_prefix", "chat mean common prefix", ".3f"),
              ("max_chat_kl", "kl_mean", "chat KL", ".4g"))


def chat_gate_failures(chat: dict[str, Any] | None, gates: Any) -> list[str]:
    """The chat gates (quality.min_chat_identical, min_chat_prefix, max_chat_kl) `chat` misses."""
    from edgelm.eval.metrics import missed_gates

    return missed_gates(chat, gates, CHAT_GATES) if chat else []
