"""One decode step of a bundle's bare graph at batch 1, 2, 4 and 8: the ceiling of batching.

No Python between steps and no prefill: every row holds `--context` tokens of KV in one shared
buffer (as batch.BatchDecoder binds it) and each step feeds one token per row. Reports the median
step time over `--steps` (the first 5 dropped) and the aggregate tokens/s against batch 1.

    python benchmarks/batch_steps.py dist/smollm2-int8 --context 300 --steps 40
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import onnxruntime as ort

import edgelm_runtime as er
from edgelm_runtime.hardware import cpu_model


def step_ms(decoder, rows: int, context: int, steps: int) -> float:
    io, kv = decoder._io, decoder._kv
    arrays = [np.zeros((rows, kv.num_kv_heads, context + steps + 1, kv.head_dim), dtype=decoder._kv_dtype)
              for _ in decoder._past_names]
    logits = np.zeros((rows, 1, decoder.vocab_size), dtype=np.float32)
    binding = decoder._session.io_binding()
    binding.bind_cpu_input(io.logits_to_keep, np.ones(1, dtype=np.int64))
    binding.bind_ortvalue_output(io.logits, ort.OrtValue.ortvalue_from_numpy(logits))
    for past, present, array in zip(decoder._past_names, decoder._present_names, arrays):
        value = ort.OrtValue.ortvalue_from_numpy(array)
        binding.bind_ortvalue_input(past, value)
        binding.bind_ortvalue_output(present, value)
    times = []
    for step in range(steps):
        length = context + step
        binding.bind_cpu_input(io.input_ids, np.full((rows, 1), 42, dtype=np.int64))
        binding.bind_cpu_input(io.attention_mask, np.ones((rows, length + 1), dtype=np.int64))
        start = time.perf_counter()
        decoder._session.run_with_iobinding(binding)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[5:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle")
    parser.add_argument("--context", type=int, default=300)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    decoder = er.load_bundle(args.bundle, threads=args.threads).decoder
    rows = []
    for n in (1, 2, 4, 8):
        ms = step_ms(decoder, n, args.context, args.steps)
        rows.append({"rows": n, "step_ms": round(ms, 2), "tok_s": round(1000 * n / ms, 1)})
    for row in rows:
        row["x_one_row"] = round(row["tok_s"] / rows[0]["tok_s"], 2)
    print(json.dumps({"bundle": args.bundle, "host": cpu_model(), "context": args.context, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
