"""Measure an encoder bundle: sentences/s and latency percentiles at batch 1 and 32, for inputs of
exactly 16 and 128 tokens, and peak RSS.

Inputs are windows of real prose (bench.TEXT) cut so each encodes to exactly N tokens, special
tokens included (the sequence length the graph sees, no padding); a batch holds different texts.
What is timed is the bundle's own call, embed(), classify() or tag() as its task says, with
tokenization and pooling: what an app sees. Each repetition runs every case for at least
`min_calls` calls and `min_seconds`; sentences_per_s is batch / the repetition's median call, its
median over the repetitions (min and max beside it): a neighbour's burst on a shared machine stalls
a few calls by 100x (seen: 7/s mean against 150/s median for PyTorch at batch 1), and the median
call does not move. wall_sentences_per_s is every call's texts over every call's time, stalls and
all; latency_ms p50/p90/p99 are over all calls. `bench_encoder` measures a
loaded model in this process; `bench_encoder_workers` runs engines in worker processes that speak
bench.serve_worker's protocol, interleaved, as `edgelm bench` does for decoders."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgelm_runtime.bench import TEXT, _machine, _peak_rss_mb, run_interleaved, serve_worker

LENGTHS = (16, 128)
BATCH_SIZES = (1, 32)
Run = Callable[[list[str]], object]  # one call of the engine on a batch of texts


def exact_texts(tokenizer: Any, tokens: int, count: int) -> list[str]:
    """`count` different windows of bench.TEXT, each `tokens` tokens long with its special tokens
    (a BundleTokenizer: its encode_batch ignores tokenizer.json's own padding and truncation)."""
    from edgelm_runtime.errors import GenerationError

    def encoded(text: str) -> Any:
        return tokenizer.encode_batch([text])[0]

    specials = len(encoded("").ids)
    words, texts, start = (TEXT * 12).split(), [], 0
    while tokens > specials and len(texts) < count and start < len(words) // 2:
        window = encoded(" ".join(words[start:start + 2 * tokens]))
        ids = [i for i, special in zip(window.ids, window.special) if not special]
        length = tokens - specials
        for _ in range(4):  # decode and encode can merge or split a token at the cut: correct once or twice
            text = tokenizer.decode(ids[:length])
            got = len(encoded(text).ids)
            if got == tokens:
                if text not in texts:
                    texts.append(text)
                break
            length += tokens - got
        start += 1
    if len(texts) < count:
        raise GenerationError(f"could not make {count} texts of exactly {tokens} tokens with this tokenizer",
                              hint=f"benchmark lengths above its {specials} special tokens, e.g. 16 and 128")
    return texts


def task_call(model: Any) -> Run:
    """The EncoderModel method its task serves, on a whole batch at once."""
    if model.manifest.encoder is None:
        from edgelm_runtime.errors import BundleError

        raise BundleError(f"{model.path} is a text-generation bundle, not an encoder bundle",
                          hint="benchmark it with edgelm bench (edgelm_runtime.bench)")
    method = {"feature-extraction": model.embed, "sequence-classification": model.classify,
              "token-classification": model.tag}[model.task]
    return lambda texts: method(texts, batch_size=len(texts))


def case_key(batch: int, tokens: int) -> str:
    return f"b{batch}_t{tokens}"


def measure(run: Run, texts: dict[int, list[str]], batch_sizes: Sequence[int], min_calls: int,
            min_seconds: float) -> dict[str, list[float]]:
    """One repetition: each (batch, tokens) case's call latencies in seconds."""
    latencies: dict[str, list[float]] = {}
    for tokens, pool in texts.items():
        for batch in batch_sizes:
            spent, calls, started = [], 0, time.perf_counter()
            while calls < min_calls or time.perf_counter() - started < min_seconds:
                chunk = [pool[(calls * batch + i) % len(pool)] for i in range(batch)]
                t0 = time.perf_counter()
                run(chunk)
                spent.append(time.perf_counter() - t0)
                calls += 1
            latencies[case_key(batch, tokens)] = spent
    return latencies


def summarize(hello: dict[str, Any], final: dict[str, Any], repetitions: list[dict[str, list[float]]]) -> dict[str, Any]:
    """One engine's row: per case sentences/s (median over repetitions, min, max) and latency percentiles."""
    cases = []
    for batch in hello["batch_sizes"]:
        for tokens in hello["lengths"]:
            key = case_key(batch, tokens)
            rates = [batch / statistics.median(r[key]) for r in repetitions]
            every = np.asarray([s for r in repetitions for s in r[key]]) * 1e3
            p50, p90, p99 = (float(v) for v in np.percentile(every, [50, 90, 99]))
            cases.append({"batch": batch, "tokens": tokens, "sentences_per_s": statistics.median(rates),
                          "sentences_per_s_min": min(rates), "sentences_per_s_max": max(rates),
                          "wall_sentences_per_s": batch * every.size / every.sum() * 1e3,
                          "latency_ms": {"p50": p50, "p90": p90, "p99": p99}, "calls": int(every.size)})
    return {**{k: hello.get(k) for k in ("name", "path", "profile", "task", "load_s", "size_mb")},
            "peak_rss_mb": final["peak_rss_mb"], "cases": cases}


def _hello(model: Any, lengths: Sequence[int], batch_sizes: Sequence[int], load_s: float | None) -> dict[str, Any]:
    manifest = model.manifest
    return {"name": manifest.name, "path": str(model.path), "profile": manifest.profile, "task": model.task,
            "load_s": load_s, "size_mb": sum(f.size for f in manifest.files.values()) / 1e6,
            "lengths": list(lengths), "batch_sizes": list(batch_sizes)}


def usable_lengths(model: Any, lengths: Sequence[int]) -> list[int]:
    """The lengths the bundle takes (a fixed-shape bundle pads every input to static_seq_len)."""
    layout = model.manifest.encoder
    return [n for n in lengths if n <= (layout.static_seq_len or layout.max_length)]


def bench_encoder(model: Any, *, lengths: Sequence[int] = LENGTHS, batch_sizes: Sequence[int] = BATCH_SIZES,
                  repeats: int = 3, warmup: int = 1, min_calls: int = 10, min_seconds: float = 1.0,
                  texts: dict[int, list[str]] | None = None,
                  progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Benchmark a loaded EncoderModel in this process; JSON-able {"bundles": [row], "settings",
    "machine"} as edgelm_runtime.bench.bench returns (peak_rss_mb: this process's peak so far)."""
    from edgelm_runtime.errors import GenerationError

    if repeats < 1 or warmup < 0 or min_calls < 1 or min_seconds < 0 or not batch_sizes:
        raise GenerationError(f"repeats {repeats}, warmup {warmup}, min calls {min_calls}, min seconds {min_seconds}: "
                              "need repeats >= 1, warmup >= 0, min calls >= 1, min seconds >= 0",
                              hint="e.g. --repeats 3 --warmup 1")
    run, repetitions = task_call(model), []  # a decoder bundle fails here
    usable = usable_lengths(model, lengths)
    if not usable:
        raise GenerationError(f"the bundle takes at most {model.manifest.encoder.max_length} tokens; none of the "
                              f"lengths {list(lengths)} fit", hint="benchmark shorter lengths")
    texts = texts or {n: exact_texts(model.tokenizer, n, max(batch_sizes)) for n in usable}
    for repetition in range(warmup + repeats):
        result = measure(run, {n: texts[n] for n in usable}, batch_sizes, min_calls, min_seconds)
        if repetition >= warmup:
            repetitions.append(result)
        if progress:
            progress("warm-up" if repetition < warmup else f"run {repetition - warmup + 1}", repetition + 1,
                     warmup + repeats)
    row = summarize(_hello(model, usable, batch_sizes, None), {"peak_rss_mb": _peak_rss_mb()}, repetitions)
    return {"bundles": [row], "settings": _settings(repeats, warmup, min_calls, min_seconds, None), "machine": _machine()}


def _settings(repeats: int, warmup: int, min_calls: int, min_seconds: float, threads: int | None) -> dict[str, Any]:
    return {"repeats": repeats, "warmup": warmup, "min_calls": min_calls, "min_seconds": min_seconds,
            "threads": threads, "tokens_counted": "with special tokens", "text": "edgelm_runtime.bench.TEXT windows"}


def serve_encoder(hello: dict[str, Any], run: Run, texts: dict[int, list[str]], min_calls: int,
                  min_seconds: float) -> None:
    """The worker side for any engine: hello (name, path, profile, task, load_s, size_mb, lengths,
    batch_sizes), then one `measure` repetition per "run" line, then peak RSS."""
    texts = {n: texts[n] for n in hello["lengths"]}
    serve_worker(hello, lambda: measure(run, texts, hello["batch_sizes"], min_calls, min_seconds))


def read_texts(path: Path) -> dict[int, list[str]]:
    """A texts file written by the parent ({"16": [...], "128": [...]}), so every engine gets the same inputs."""
    return {int(n): texts for n, texts in json.loads(path.read_text(encoding="utf-8")).items()}


def worker_command(bundle: str | Path, texts_file: Path, threads: int | None, min_calls: int, min_seconds: float,
                   batch_sizes: Sequence[int] = BATCH_SIZES) -> list[str]:
    command = [sys.executable, "-m", "edgelm_runtime.encoder_bench", "--worker", str(bundle), "--texts", str(texts_file),
               "--min-calls", str(min_calls), "--min-seconds", str(min_seconds),
               "--batch-sizes", ",".join(map(str, batch_sizes))]
    return command + (["--threads", str(threads)] if threads is not None else [])


def bench_encoder_workers(workers: Sequence[tuple[str, list[str]]], repeats: int = 5, warmup: int = 1,
                          settings: dict[str, Any] | None = None,
                          progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Run (label, command) workers that speak `serve_encoder`'s protocol, one repetition each in
    turn (interleaved: machine noise hits every engine alike); ratios against the first row."""
    rows = [summarize(hello, final, results) for hello, final, results in run_interleaved(workers, repeats, warmup, progress)]
    base = {(c["batch"], c["tokens"]): c["sentences_per_s"] for c in rows[0]["cases"]}
    for row in rows:
        for case in row["cases"]:
            reference = base.get((case["batch"], case["tokens"]))
            case["ratio_vs_first"] = case["sentences_per_s"] / reference if reference else None
    return {"bundles": rows, "settings": {**(settings or {}), "repeats": repeats, "warmup": warmup},
            "machine": _machine()}


def bench_encoder_bundles(bundles: Sequence[str | Path], threads: int | None = None, repeats: int = 5, warmup: int = 1,
                          min_calls: int = 10, min_seconds: float = 1.0,
                          progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """`edgelm bench` of encoder bundles: each in its own worker process, interleaved, on the same
    texts (made with the first bundle's tokenizer); ratios against the first bundle."""
    import tempfile

    import edgelm_runtime as er
    from edgelm_runtime.bundle import verify_bundle
    from edgelm_runtime.errors import BundleError

    for bundle in bundles:
        if verify_bundle(Path(bundle)).encoder is None:
            raise BundleError(f"{bundle} is a text-generation bundle; benchmark encoder and decoder bundles separately",
                              hint="edgelm bench ENCODER_BUNDLE [ENCODER_BUNDLE ...]")
    first = er.load_bundle(bundles[0])
    texts = {n: exact_texts(first.tokenizer, n, max(BATCH_SIZES)) for n in usable_lengths(first, LENGTHS)}
    with tempfile.TemporaryDirectory(prefix="edgelm-bench-") as folder:
        texts_file = Path(folder) / "texts.json"
        texts_file.write_text(json.dumps({str(n): t for n, t in texts.items()}), encoding="utf-8")
        workers = [(str(b), worker_command(b, texts_file, threads, min_calls, min_seconds)) for b in bundles]
        return bench_encoder_workers(workers, repeats, warmup, _settings(repeats, warmup, min_calls, min_seconds, threads),
                                     progress)


def main() -> None:
    parser = argparse.ArgumentParser(description="edgelm encoder benchmark worker (use edgelm bench)")
    parser.add_argument("--worker", required=True)
    parser.add_argument("--texts", type=Path, required=True)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--min-calls", type=int, default=10)
    parser.add_argument("--min-seconds", type=float, default=1.0)
    parser.add_argument("--batch-sizes", default=",".join(map(str, BATCH_SIZES)))
    args = parser.parse_args()
    started = time.perf_counter()
    import edgelm_runtime as er

    model = er.load_bundle(args.worker, threads=args.threads)
    texts = read_texts(args.texts)
    hello = _hello(model, usable_lengths(model, sorted(texts)), [int(b) for b in args.batch_sizes.split(",")],
                   time.perf_counter() - started)
    serve_encoder(hello, task_call(model), texts, args.min_calls, args.min_seconds)


if __name__ == "__main__":
    main()
