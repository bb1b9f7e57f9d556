"""Decode speed and time to first token of one or more bundles, measured in the same run.

    python benchmarks/decode_speed.py dist/smollm2-fp32 dist/smollm2-int8 --tokens 128 --repeats 5

Generation is forced to length (eos ignored by sampling greedily from a fixed prompt and
counting only runs that reach --tokens); bundles are interleaved per repetition so machine noise
hits them alike. Prints medians (min-max) and the ratio of each bundle to the first."""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

import edgelm_runtime as er
from edgelm_runtime.session import open_decoder

PROMPT = "Write a detailed story about a lighthouse keeper who finds a message in a bottle. " * 3


def measure(llm: er.LanguageModel, decoder, prompt_ids: list[int], tokens: int) -> tuple[float, float]:
    """(time to first token in s, decode tokens/s) with argmax on every step, eos ignored."""
    start = time.perf_counter()
    logits, past = decoder.run(np.asarray([prompt_ids], np.int64))
    token = int(logits[0, -1].argmax())
    ttft = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(tokens):
        logits, past = decoder.run(np.asarray([[token]], np.int64), past)
        token = int(logits[0, -1].argmax())
    return ttft, tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundles", nargs="+")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    models = []
    for path in args.bundles:
        llm = er.load_bundle(path)
        decoder = open_decoder(llm.path / llm.manifest.model_file, llm.manifest, threads=args.threads)
        models.append((path, llm, decoder))
    prompt = models[0][1].tokenizer.encode(PROMPT, add_special_tokens=False)
    results = {path: [] for path, _, _ in models}
    for _, llm, decoder in models:  # warm-up
        measure(llm, decoder, prompt, 8)
    for _ in range(args.repeats):
        for path, llm, decoder in models:
            results[path].append(measure(llm, decoder, prompt, args.tokens))
    base = statistics.median(r[1] for r in results[models[0][0]])
    print(f"prompt {len(prompt)} tokens, {args.tokens} decode tokens, {args.repeats} repeats, {args.threads} threads")
    print(f"{'bundle':<40} {'decode tok/s median (min-max)':<32} {'TTFT ms median':<16} ratio")
    for path, runs in results.items():
        speeds, ttfts = [r[1] for r in runs], [r[0] * 1000 for r in runs]
        median = statistics.median(speeds)
        print(f"{path:<40} {median:7.1f} ({min(speeds):.1f}-{max(speeds):.1f}){'':<14} "
              f"{statistics.median(ttfts):8.0f}{'':<8} x{median / base:.2f}")


if __name__ == "__main__":
    main()
