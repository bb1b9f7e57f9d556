"""Time to first token by chat turn, with prefix KV reuse and with a full re-prefill, in one run.

One greedy conversation over the held-out chat prompts (MT-Bench and chatterbot openers, as the
chat fidelity check reads them), each turn sent with its whole history. The same bundle is
opened twice: with the prefix cache (the default) and with kv_cache_mb=0. Each turn runs on
both, interleaved, `--repeats` times (the cold side's cache is empty by construction; the warm
side's holds the previous turn). Reported per turn: prompt tokens, tokens reused, median TTFT of
each, the ratio, and whether the replies are token for token the same (where not, the token where
they part and the cold run's top-2 logit margin there).

    python benchmarks/chat_reuse.py dist/smollm2-int8 --turns 6 --tokens 48 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics

import edgelm_runtime as er
from edgelm.eval.chat_data import held_out_chat_prompts
from edgelm_runtime.hardware import cpu_model
from edgelm_runtime.sampling import SamplingParams
from prompt_lookup import divergence  # benchmarks/ is the script's folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle")
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=48, help="new tokens per reply")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    warm = er.load_bundle(args.bundle, threads=args.threads)
    cold = er.load_bundle(args.bundle, threads=args.threads, kv_cache_mb=0)
    greedy = SamplingParams()
    messages: list[dict[str, str]] = []
    rows, previous = [], None
    for turn, prompt in enumerate(held_out_chat_prompts()[:args.turns], start=1):
        messages.append({"role": "user", "content": prompt})
        ids = warm.chat_prompt_ids(messages, max_new_tokens=args.tokens)
        ttft: dict[str, list[float]] = {"reuse": [], "cold": []}
        replies: dict[str, list[int]] = {}
        for repeat in range(args.repeats):
            if repeat:  # back to what the cache held when this turn arrived: the previous turn's run
                warm.kv_cache.clear()
                if previous is not None:
                    list(warm.generate_tokens(previous, args.tokens, greedy))
            for name, llm in (("reuse", warm), ("cold", cold)):
                replies[name] = list(llm.generate_tokens(ids, args.tokens, greedy))
                ttft[name].append(llm.last_stats.time_to_first_token_s)
                if name == "reuse":
                    reused = llm.last_stats.cached_tokens
        reuse_ms, cold_ms = (1000 * statistics.median(ttft[name]) for name in ("reuse", "cold"))
        rows.append({"turn": turn, "prompt_tokens": len(ids), "reused_tokens": reused,
                     "ttft_reuse_ms": round(reuse_ms, 1), "ttft_cold_ms": round(cold_ms, 1),
                     "speedup": round(cold_ms / reuse_ms, 2), "identical": replies["reuse"] == replies["cold"]})
        if replies["reuse"] != replies["cold"]:
            rows[-1]["divergence"] = divergence(cold, ids, replies["cold"], replies["reuse"])
        previous = ids
        messages.append({"role": "assistant", "content": warm.tokenizer.decode(replies["cold"])})
    print(json.dumps({"bundle": args.bundle, "host": cpu_model(), "python": platform.python_version(),
                      "tokens": args.tokens, "repeats": args.repeats, "turns": rows}, indent=2))


if __name__ == "__main__":
    main()
