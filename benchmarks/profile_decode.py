"""Where the time goes per generated token: model kernels, onnxruntime's own run overhead, and Python.

    python benchmarks/profile_decode.py dist/smollm2-int8 --tokens 128 --threads 2

Runs the runtime's decode loop (Stepper + greedy sampling) twice: once plain, timed with
perf_counter (the per-token wall time an app sees), and once under onnxruntime's profiler, whose
trace gives each run's duration inside onnxruntime ("model_run") and each kernel's. Per token:
wall = model_run + Python (binding, sampling, loop); model_run = kernels + onnxruntime overhead.
The profiler adds its own cost to model_run, so the kernel shares come from the profiled pass and
the Python share from the plain one."""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

import edgelm_runtime as er
from edgelm_runtime.session import DecoderSession, session_options

PROMPT = "The lighthouse keeper climbed the spiral stairs at dusk, as he had every evening for thirty years. " * 4


class TimedSession:
    """Forwards to an InferenceSession, recording the seconds of each run_with_iobinding call."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self._session, self.seconds = session, []

    def run_with_iobinding(self, binding: ort.IOBinding) -> None:
        start = time.perf_counter()
        self._session.run_with_iobinding(binding)
        self.seconds.append(time.perf_counter() - start)

    def __getattr__(self, name: str):
        return getattr(self._session, name)


def weight_bytes_per_token(model_path: Path) -> int:
    """Bytes of weights one decode step reads: every initializer, except that an embedding table
    read only by a Gather contributes one row. KV cache and activations are not counted."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    gathered = {n.input[0] for n in model.graph.node if n.op_type in ("Gather", "GatherBlockQuantized")}
    other_uses = {name for n in model.graph.node if n.op_type not in ("Gather", "GatherBlockQuantized") for name in n.input}
    tables = gathered - other_uses  # a tied LM head reads the whole table every step
    total = 0
    for init in model.graph.initializer:
        size = next((int(e.value) for e in init.external_data if e.key == "length"), len(init.raw_data))
        total += size // init.dims[0] if init.name in tables and init.dims else size
    return total


def read_bandwidth_gbs() -> float:
    """Best of 6 fp32 matrix-vector products over 512 MB (numpy's BLAS, all cores): the access
    pattern of decode, which streams each weight once per token."""
    matrix = np.random.default_rng(0).random((16384, 8192), dtype=np.float32)
    vector = np.ones(8192, dtype=np.float32)
    best = float("inf")
    for _ in range(6):
        start = time.perf_counter()
        matrix @ vector
        best = min(best, time.perf_counter() - start)
    return matrix.nbytes / best / 1e9


def decode(decoder: DecoderSession, prompt: list[int], tokens: int) -> list[float]:
    """Per-token wall seconds of `tokens` greedy steps after the prompt."""
    stepper = decoder.stepper(len(prompt) + tokens + 1)
    token = int(stepper.feed(np.asarray(prompt)).argmax())
    step, times = np.zeros(1, np.int64), []
    for _ in range(tokens):
        start = time.perf_counter()
        step[0] = token
        token = int(stepper.feed(step).argmax())
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bandwidth-gbs", type=float,
                        help="memory read bandwidth, GB/s (default: measured here with a 512 MB matrix-vector product)")
    args = parser.parse_args()
    llm = er.load_bundle(args.bundle, threads=args.threads)
    prompt = llm.tokenizer.encode(PROMPT, add_special_tokens=False)[:128]
    decode(llm.decoder, prompt, 16)  # warm-up
    timed = TimedSession(llm.decoder._session)
    llm.decoder._session = timed
    wall_times = decode(llm.decoder, prompt, args.tokens)
    wall, inside = statistics.mean(wall_times), statistics.mean(timed.seconds[1:])  # [0]: the prompt

    options = session_options(llm.manifest, args.threads)
    options.enable_profiling = True
    options.profile_file_prefix = "/tmp/edgelm_profile"
    session = ort.InferenceSession(str(Path(args.bundle) / llm.manifest.model_file), options,
                                   providers=[llm.manifest.provider])
    profiled = DecoderSession(session, llm.manifest)
    decode(profiled, prompt, args.tokens)
    trace = json.loads(Path(session.end_profiling()).read_text())
    runs = [e for e in trace if e.get("name") == "model_run"]
    decode_start = runs[0]["ts"] + runs[0]["dur"]  # the first run is the prompt's prefill
    kernels = collections.Counter()
    for event in trace:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and event["ts"] >= decode_start:
            kernels[event["args"]["op_name"]] += event["dur"] / 1e6
    run = statistics.median(e["dur"] / 1e6 for e in runs[1:])
    kernel_total = sum(kernels.values()) / len(runs[1:])
    print(f"{args.bundle}: {args.tokens} decode tokens after {len(prompt)} prompt tokens, {args.threads} threads")
    print(f"wall per token (mean)           {wall * 1e3:7.3f} ms  ({1 / wall:.1f} tok/s)")
    print(f"  inside onnxruntime's run      {inside * 1e3:7.3f} ms")
    print(f"  Python: binding, argmax, loop {(wall - inside) * 1e6:7.0f} µs  ({(wall - inside) / wall:.1%})")
    print(f"profiled pass: run {run * 1e3:.3f} ms (median), kernels {kernel_total * 1e3:.3f} ms "
          f"(the rest is onnxruntime's executor and the profiler itself)")
    read = weight_bytes_per_token(Path(args.bundle) / llm.manifest.model_file)
    bandwidth = args.bandwidth_gbs or read_bandwidth_gbs()
    limit = bandwidth * 1e9 / read
    print(f"weights read per token {read / 1e6:.0f} MB; read bandwidth {bandwidth:.1f} GB/s"
          f"{'' if args.bandwidth_gbs else ' (measured)'}: bandwidth-bound limit {limit:.0f} tok/s; "
          f"this run reaches {1 / wall / limit:.0%} of it")
    print("kernel time by op type (share of kernel time):")
    for op, seconds in kernels.most_common(8):
        print(f"  {op:<36} {seconds / sum(kernels.values()):6.1%}")


if __name__ == "__main__":
    main()
