"""Measure bundles on this machine: load time, time to first token, prefill and decode speed, RSS.

Each bundle runs in its own worker process (`python -m edgelm_runtime.bench --worker BUNDLE`), so
its load time starts from a cold import and its peak RSS is its own. The parent asks the workers
for one repetition each in turn (interleaved), so machine noise hits every bundle alike and the
ratios against the first bundle are fair. Reported: medians with min and max over the repetitions.

What is timed, per repetition:
- ttft_ms[N]: tokenize a text of N tokens + prefill + pick the first token (end-to-end);
  tokenize_ms[N] is its tokenization part.
- prefill_tokens_per_s: the longest prompt's model run alone (llama-bench's "pp" compares).
- decode_tokens_per_s: steady state after a 128-token prompt (shorter where the context is smaller:
  `decode_prompt_tokens`), generation forced to `decode_tokens`
  tokens (eos ignored), each step = model run + greedy sampling + streaming detokenization
  (end-to-end, what an app sees). decode_model_tokens_per_s: the model runs alone (llama-bench's
  "tg" and onnxruntime-genai's token generation compare with this one); sampling_us and
  detokenize_us are the per-token rest."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

PROMPT_LENGTHS = (32, 128, 512)
DECODE_PROMPT = 128
# the schema whose grammar mask is timed per token ("grammar_us": mask + advance, the model excluded)
GRAMMAR_SCHEMA = {"type": "object", "required": ["name", "items", "total", "status"], "additionalProperties": False,
                  "properties": {"name": {"type": "string", "maxLength": 40},
                                 "items": {"type": "array", "maxItems": 4, "items": {
                                     "type": "object", "required": ["product", "quantity"],
                                     "properties": {"product": {"type": "string"}, "quantity": {"type": "integer"}}}},
                                 "total": {"type": "number"}, "status": {"enum": ["new", "paid", "shipped"]}}}
TEXT = ("The lighthouse keeper climbed the spiral stairs at dusk, as he had every evening for thirty years. "
        "Below him the sea rolled grey and restless against the rocks, and far out a single ship crept "
        "along the horizon. He lit the great lamp, checked the clockwork that turned it, and wrote the "
        "weather into his log: wind from the west, rising; visibility fair; no vessels in distress. ")


def _worker(bundle: str, threads: int | None, decode_tokens: int, provider: str | None = None) -> None:
    """Load one bundle, then answer "run" lines with one repetition's timings as JSON."""
    started = time.perf_counter()
    import numpy as np

    import edgelm_runtime as er
    from edgelm_runtime.sampling import Sampler, SamplingParams

    llm = er.load_bundle(bundle, threads=threads, provider=provider)
    load_s = time.perf_counter() - started
    tokenizer, decoder = llm.tokenizer, llm.decoder
    reference = tokenizer.encode(TEXT * 40, add_special_tokens=False)
    lengths = [n for n in PROMPT_LENGTHS if n + decode_tokens < llm.manifest.max_seq_len]
    # a small context (an NPU bundle's window) gets a shorter decode prompt, and says so
    decode_prompt = min(DECODE_PROMPT, llm.manifest.max_seq_len - decode_tokens - 1)
    if decode_prompt < 1:
        from edgelm_runtime.errors import GenerationError

        raise GenerationError(f"{decode_tokens} decode tokens do not fit the context of {llm.manifest.max_seq_len}",
                              hint="pass fewer --decode-tokens")
    texts = {n: tokenizer.decode(reference[: n + 16]) for n in lengths}  # encodes to >= n tokens
    sampler = Sampler(SamplingParams())

    def repetition() -> dict[str, Any]:
        result: dict[str, Any] = {"ttft_ms": {}, "tokenize_ms": {}}
        for n in lengths:
            start = time.perf_counter()
            ids = tokenizer.encode(texts[n], add_special_tokens=False)[:n]
            tokenized = time.perf_counter()
            stepper = decoder.stepper(n + 1)
            logits = stepper.feed(np.asarray(ids, dtype=np.int64))
            prefilled = time.perf_counter()
            sampler.sample(logits)
            result["ttft_ms"][str(n)] = (time.perf_counter() - start) * 1e3
            result["tokenize_ms"][str(n)] = (tokenized - start) * 1e3
            result["prefill_tokens_per_s"] = n / (prefilled - tokenized)
        stepper = decoder.stepper(decode_prompt + decode_tokens + 1)
        token = sampler.sample(stepper.feed(np.asarray(reference[:decode_prompt], dtype=np.int64)))
        detokenizer = tokenizer.incremental_decoder()
        step, model_s, sampling_s, detok_s = np.zeros(1, dtype=np.int64), 0.0, 0.0, 0.0
        start = time.perf_counter()
        for _ in range(decode_tokens):
            t0 = time.perf_counter()
            step[0] = token
            logits = stepper.feed(step)
            t1 = time.perf_counter()
            token = sampler.sample(logits)
            t2 = time.perf_counter()
            detokenizer.push(token)
            detok_s += time.perf_counter() - t2
            model_s, sampling_s = model_s + t1 - t0, sampling_s + t2 - t1
        total = time.perf_counter() - start
        result.update(decode_tokens_per_s=decode_tokens / total, decode_model_tokens_per_s=decode_tokens / model_s,
                      sampling_us=sampling_s / decode_tokens * 1e6, detokenize_us=detok_s / decode_tokens * 1e6)
        constraint = llm.constraint(json_schema=GRAMMAR_SCHEMA)  # greedy decoding of GRAMMAR_SCHEMA, masked
        for _ in llm.generate_tokens(reference[:decode_prompt], decode_tokens, SamplingParams(), constraint):
            pass
        result["grammar_us"] = constraint.stats.mask_seconds / max(1, constraint.stats.masked_steps) * 1e6
        return result

    manifest = llm.manifest
    kv = manifest.kv
    kv_bytes_per_token = 2 * kv.num_layers * kv.num_kv_heads * kv.head_dim * (2 if kv.dtype == "float16" else 4)
    positions = max([n + 1 for n in lengths] + [decode_prompt + decode_tokens + 1])
    if manifest.static is not None:  # a fixed window, whatever the sequence's length
        positions = manifest.static.kv_window
    serve_worker({"name": manifest.name, "path": bundle, "profile": manifest.profile, "load_s": load_s,
                  "size_mb": sum(f.size for f in manifest.files.values()) / 1e6, "prompt_lengths": lengths,
                  "kv_cache_mb": kv_bytes_per_token * positions / 1e6, "decode_prompt_tokens": decode_prompt}, repetition)


def serve_worker(hello: dict[str, Any], repetition: Callable[[], dict[str, Any]]) -> None:
    """The worker side of the protocol, for any engine: `hello` once (name, path, profile, load_s,
    size_mb, prompt_lengths, kv_cache_mb), then one repetition per "run" line, then peak RSS.
    A repetition returns ttft_ms/tokenize_ms {length: ms}, prefill_tokens_per_s,
    decode_tokens_per_s, decode_model_tokens_per_s, sampling_us and detokenize_us."""
    _send(hello)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        _send(repetition())
    _send({"peak_rss_mb": _peak_rss_mb()})


def _send(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def _peak_rss_mb() -> float:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def worker_command(bundle: str | Path, threads: int | None, decode_tokens: int, provider: str | None = None) -> list[str]:
    command = [sys.executable, "-m", "edgelm_runtime.bench", "--worker", str(bundle), "--decode-tokens", str(decode_tokens)]
    command += ["--threads", str(threads)] if threads is not None else []
    return command + (["--provider", provider] if provider else [])


class _Worker:
    def __init__(self, command: list[str], label: str) -> None:
        self.label = label
        self._process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.hello = self._receive()

    def run(self) -> dict[str, Any]:
        self._process.stdin.write("run\n")
        self._process.stdin.flush()
        return self._receive()

    def stop(self) -> dict[str, Any]:
        self._process.stdin.write("stop\n")
        self._process.stdin.flush()
        result = self._receive()
        self._process.wait(timeout=30)
        return result

    def kill(self) -> None:
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait()

    def _receive(self) -> dict[str, Any]:
        from edgelm_runtime.errors import BundleError

        line = self._process.stdout.readline()
        if not line:
            self._process.wait()
            error = self._process.stderr.read().strip().splitlines()
            raise BundleError(f"{self.label}: the benchmark worker stopped ({error[-1] if error else 'no output'})",
                              hint=f"check that it loads and runs on its own: edgelm generate {self.label} 'Hello'")
        return json.loads(line)


def bench(bundles: Sequence[str | Path], threads: int | None = None, repeats: int = 5, warmup: int = 1,
          decode_tokens: int = 128, progress: Callable[[str, int, int], None] | None = None,
          provider: str | None = None) -> dict[str, Any]:
    """Benchmark bundles interleaved; returns the stable JSON schema (see the module docstring).
    `provider` runs every bundle on that execution provider instead of its manifest's."""
    from edgelm_runtime.bundle import verify_bundle

    for bundle in bundles:
        verify_bundle(Path(bundle))  # a bad bundle fails here, before any timing
    workers = [(str(b), worker_command(b, threads, decode_tokens, provider)) for b in bundles]
    return bench_workers(workers, threads, repeats, warmup, decode_tokens, progress)


def bench_workers(workers: Sequence[tuple[str, list[str]]], threads: int | None, repeats: int, warmup: int,
                  decode_tokens: int, progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Run (label, command) workers that speak `serve_worker`'s protocol, interleaved, and
    summarise them; benchmarks/compare_peers.py puts llama.cpp and onnxruntime-genai beside bundles this way."""
    from edgelm_runtime.errors import GenerationError

    if repeats < 1 or warmup < 0 or decode_tokens < 1:
        raise GenerationError(f"repeats {repeats}, warmup {warmup}, decode tokens {decode_tokens}: need "
                              "repeats >= 1, warmup >= 0, decode tokens >= 1", hint="e.g. --repeats 5 --warmup 1")
    rows = [_row(hello, final, results) for hello, final, results in run_interleaved(workers, repeats, warmup, progress)]
    base = rows[0]["decode_tokens_per_s"]
    for row in rows:
        row["decode_ratio_vs_first"] = row["decode_tokens_per_s"] / base
    return {"bundles": rows, "settings": {"threads": threads, "repeats": repeats, "warmup": warmup,
                                          "decode_tokens": decode_tokens, "decode_prompt_tokens": DECODE_PROMPT},
            "machine": _machine()}


def run_interleaved(workers: Sequence[tuple[str, list[str]]], repeats: int, warmup: int,
                    progress: Callable[[str, int, int], None] | None = None) -> list[tuple[dict, dict, list]]:
    """Start (label, command) workers that speak `serve_worker`'s protocol one after the other (load
    times are not contended), then run warmup + repeats repetitions, each worker in turn
    (interleaved: machine noise hits every engine alike); (hello, final, timed results) per worker."""
    started: list[_Worker] = []
    runs: list[list[Any]] = [[] for _ in workers]
    total, done = len(workers) * (warmup + repeats), 0
    try:
        for label, command in workers:
            started.append(_Worker(command, label))
        for repetition in range(warmup + repeats):
            for index, worker in enumerate(started):
                result = worker.run()
                if repetition >= warmup:
                    runs[index].append(result)
                done += 1
                if progress:
                    what = "warm-up" if repetition < warmup else f"run {repetition - warmup + 1}"
                    progress(f"{worker.hello['name']} ({what})", done, total)
        finals = [worker.stop() for worker in started]
    finally:
        for worker in started:
            worker.kill()
    return [(worker.hello, final, results) for worker, final, results in zip(started, finals, runs)]


def _row(hello: dict[str, Any], final: dict[str, Any], results: list[dict[str, Any]]) -> dict[str, Any]:
    def spread(values: list[float]) -> dict[str, float]:
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    lengths = [str(n) for n in hello["prompt_lengths"]]
    keys = ("decode_tokens_per_s", "decode_model_tokens_per_s", "prefill_tokens_per_s", "sampling_us", "detokenize_us",
            "grammar_us")
    detail = {key: spread([r[key] for r in results]) for key in keys if key in results[0]}  # peers time no grammar
    detail["ttft_ms"] = {n: spread([r["ttft_ms"][n] for r in results]) for n in lengths}
    detail["tokenize_ms"] = {n: spread([r["tokenize_ms"][n] for r in results]) for n in lengths}
    return {
        "name": hello["name"], "path": hello["path"], "profile": hello["profile"],
        "decode_tokens_per_s": detail["decode_tokens_per_s"]["median"],
        "prefill_tokens_per_s": detail["prefill_tokens_per_s"]["median"],
        "ttft_ms": {n: detail["ttft_ms"][n]["median"] for n in lengths},
        "peak_rss_mb": final["peak_rss_mb"], "load_s": hello["load_s"], "size_mb": hello["size_mb"],
        "kv_cache_mb": hello["kv_cache_mb"], "decode_prompt_tokens": hello.get("decode_prompt_tokens", DECODE_PROMPT),
        "detail": detail,
    }


def _machine() -> dict[str, Any]:
    import platform

    import onnxruntime

    from edgelm_runtime.hardware import amx_probe, cpu_flags, cpu_model

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "isa": cpu_flags(), "amx_usable": amx_probe()[0],
            "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}


def main() -> None:
    parser = argparse.ArgumentParser(description="edgelm benchmark worker (use `edgelm bench`)")
    parser.add_argument("--worker", required=True)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--provider")
    args = parser.parse_args()
    _worker(args.worker, args.threads, args.decode_tokens, args.provider)


if __name__ == "__main__":
    main()
