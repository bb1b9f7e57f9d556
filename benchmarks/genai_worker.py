"""onnxruntime-genai behind edgelm bench's worker protocol, to put it beside edgelm bundles as a peer.

    /path/to/genai-venv/bin/python benchmarks/genai_worker.py --model DIR --threads 2 --tokens 128

DIR is a folder made by onnxruntime-genai's model builder (genai_config.json, model.onnx, tokenizer):

    python -m onnxruntime_genai.models.builder -i HF_DIR -o DIR -p int4 -e cpu -c CACHE \
        --extra_options accuracy_level=4 block_size=32

Run it with a Python that has onnxruntime-genai (a venv made with --system-site-packages, so
edgelm_runtime and onnxruntime come from the system install), and drive it from the system Python:

    from edgelm_runtime.bench import bench_workers
    bench_workers([("genai int4", [VENV_PY, "benchmarks/genai_worker.py", "--model", DIR,
                                   "--threads", "2", "--tokens", "128"])], 2, 5, 1, 128)

Measured the way edgelm_runtime/bench.py's own worker measures a bundle:
- ttft_ms[N]: tokenize a text of >= N tokens, truncate to N ids, make a fresh generator (greedy,
  max_length N + 1), append_tokens (the prefill), generate_next_token (picks the first token from
  the prefill's logits). The generator's construction (it allocates the KV cache) is timed with the
  prefill, as edgelm's bench times its stepper's construction (IO binding + KV buffers).
- prefill_tokens_per_s: N / (generator + append_tokens + first generate_next_token), largest N.
- decode: fresh generator, the first DECODE_PROMPT reference ids appended, the first token picked
  outside the timing (as edgelm's bench samples the prefill's logits before its loop), then
  `tokens` steps of generate_next_token (each runs the model on the previous token, then picks the
  next), get_next_tokens and an incremental detokenization with the tokenizer stream. Generation is
  forced to length with min_length = max_length (genai suppresses eos below min_length); the
  worker checks it got every token.

Chat mode, for benchmarks/peer_chat_agreement.py (same --model and --threads, no bench protocol):

    /path/to/genai-venv/bin/python benchmarks/genai_worker.py --model DIR --threads 2 \
        --chat REQUEST.json --out RESULT.npz

REQUEST.json: {"prompts": [[ids]...], "tokens": T, "answers": [[ids]...] or null, "check_text": str}.
For each prompt: the greedy answer (fresh generator, max_length = prompt + T, stops at eos, which
is not included), then a fresh generator on prompt + teacher answer (the request's answers, or its
own when null) and the logits of its one prefill run (genai returns every position's) at the rows
that predict the teacher's tokens. RESULT.npz: `logits` (those rows of all prompts, concatenated,
float32) and `meta` (JSON bytes: answers, ended, check_ids = the tokenizer's ids for check_text).
"""

from __future__ import annotations

import time

_STARTED = time.perf_counter()  # load_s counts from here: imports included, as edgelm's worker does

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402


def _precision(model_dir: Path, filename: str) -> str:
    """int4 / int8 from the builder's quantized initializer names (weight_Q4 / weight_Q8), else the
    float type of the graph's I/O as genai reports it later; a byte scan, so onnx is not imported."""
    graph = (model_dir / filename).read_bytes()
    if b"MatMulNBits" in graph or b"GatherBlockQuantized" in graph:
        for bits in ("4", "8"):
            if f"_Q{bits}".encode() in graph:
                return f"int{bits}"
        return "quantized"
    return ""


def chat(og: Any, model: Any, tokenizer: Any, request: dict[str, Any], out: Path) -> None:
    """Chat mode (see above): greedy answers and teacher-forced logits, all prompts in this process."""
    import numpy as np

    eos = {int(t) for t in tokenizer.eos_token_ids}
    tokens, teachers = request["tokens"], request.get("answers")

    def generator(max_length: int) -> Any:
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=max_length)
        return og.Generator(model, params)

    answers, ended, rows = [], [], []
    for i, ids in enumerate(request["prompts"]):
        gen = generator(len(ids) + tokens)
        gen.append_tokens(ids)
        answer, stop = [], False
        while len(answer) < tokens:
            gen.generate_next_token()  # the first one picks from the prefill's logits
            token = int(gen.get_next_tokens()[0])
            if token in eos:
                stop = True
                break
            answer.append(token)
        del gen
        answers.append(answer)
        ended.append(stop)
        teacher = answer if teachers is None else teachers[i]
        if teacher:
            gen = generator(len(ids) + len(teacher))
            gen.append_tokens([*ids, *teacher])
            rows.append(np.asarray(gen.get_output("logits"), dtype=np.float32)[0, len(ids) - 1: -1])
            del gen
    logits = np.concatenate(rows) if rows else np.zeros((0, 0), dtype=np.float32)
    meta = {"answers": answers, "ended": ended, "check_ids": [int(t) for t in tokenizer.encode(request["check_text"])]}
    np.savez(out, logits=logits, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path, help="onnxruntime-genai model folder")
    parser.add_argument("--threads", type=int, help="intra-op threads (default: onnxruntime's choice)")
    parser.add_argument("--tokens", type=int, default=128, help="decode tokens per repetition")
    parser.add_argument("--precision", help="label for the row name (default: read from the model)")
    parser.add_argument("--chat", type=Path, help="chat mode: a request JSON (see above)")
    parser.add_argument("--out", type=Path, help="chat mode: where to write the result .npz")
    args = parser.parse_args()
    if bool(args.chat) != bool(args.out):
        parser.error("--chat and --out go together")

    import numpy as np
    import onnxruntime_genai as og

    try:
        from edgelm_runtime.bench import DECODE_PROMPT, PROMPT_LENGTHS, TEXT, serve_worker
    except ImportError:  # a venv without the system site-packages: use the repo's runtime
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))
        from edgelm_runtime.bench import DECODE_PROMPT, PROMPT_LENGTHS, TEXT, serve_worker

    model_dir = args.model.resolve()
    config = og.Config(str(model_dir))
    if args.threads is not None:
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": args.threads}}}}))
    model = og.Model(config)
    tokenizer = og.Tokenizer(model)
    load_s = time.perf_counter() - _STARTED
    if args.chat:
        chat(og, model, tokenizer, json.loads(args.chat.read_text()), args.out)
        return

    decode_tokens = args.tokens
    genai_config = json.loads((model_dir / "genai_config.json").read_text())
    decoder_config = genai_config["model"]["decoder"]
    context = genai_config["model"]["context_length"]
    eos = set(int(t) for t in tokenizer.eos_token_ids)
    reference = tokenizer.encode(TEXT * 40)  # genai's encode adds no bos here: same ids as HF's add_special_tokens=False
    lengths = [n for n in PROMPT_LENGTHS if n + decode_tokens < context]
    texts = {n: tokenizer.decode(reference[: n + 16]) for n in lengths}  # encodes to >= n tokens

    def generator(max_length: int) -> og.Generator:
        params = og.GeneratorParams(model)
        # Greedy; min_length = max_length keeps eos out, so every run has exactly max_length tokens.
        # max_length also sizes genai's shared past/present KV buffer (past_present_share_buffer).
        params.set_search_options(do_sample=False, max_length=max_length, min_length=max_length)
        return og.Generator(model, params)

    def repetition() -> dict[str, Any]:
        result: dict[str, Any] = {"ttft_ms": {}, "tokenize_ms": {}}
        for n in lengths:
            start = time.perf_counter()
            ids = tokenizer.encode(texts[n])[:n]
            tokenized = time.perf_counter()
            gen = generator(n + 1)
            gen.append_tokens(ids)  # runs the model on the prompt
            gen.generate_next_token()  # picks the first token from the prefill's logits (no model run)
            first = time.perf_counter()
            if len(ids) != n or gen.token_count() != n + 1:
                raise RuntimeError(f"prompt {n}: got {len(ids)} ids, {gen.token_count()} tokens after the first")
            result["ttft_ms"][str(n)] = (first - start) * 1e3
            result["tokenize_ms"][str(n)] = (tokenized - start) * 1e3
            result["prefill_tokens_per_s"] = n / (first - tokenized)
            del gen
        gen = generator(DECODE_PROMPT + 1 + decode_tokens)
        gen.append_tokens(reference[:DECODE_PROMPT])
        gen.generate_next_token()  # the first token, from the prompt's logits: outside the timing
        stream = tokenizer.create_stream()
        stream.decode(int(gen.get_next_tokens()[0]))
        generated, model_s, detok_s = [], 0.0, 0.0
        start = time.perf_counter()
        for _ in range(decode_tokens):
            t0 = time.perf_counter()
            gen.generate_next_token()  # the model on the previous token, then greedy argmax over its logits
            t1 = time.perf_counter()
            token = int(gen.get_next_tokens()[0])
            t2 = time.perf_counter()
            stream.decode(token)
            detok_s += time.perf_counter() - t2
            model_s += t1 - t0
            generated.append(token)
        total = time.perf_counter() - start
        if len(generated) != decode_tokens or gen.token_count() != DECODE_PROMPT + 1 + decode_tokens or eos & set(generated):
            raise RuntimeError(f"decode: {len(generated)} of {decode_tokens} tokens, {gen.token_count()} in the "
                               f"sequence, eos generated: {bool(eos & set(generated))}")
        del gen
        # genai samples inside generate_next_token (greedy here), so "model only" includes the argmax
        # over the vocabulary and sampling_us is 0.0: no separate sampling step to time.
        return {**result, "decode_tokens_per_s": decode_tokens / total, "decode_model_tokens_per_s": decode_tokens / model_s,
                "sampling_us": 0.0, "detokenize_us": detok_s / decode_tokens * 1e6}

    # The KV cache genai allocates per generator: max_length positions of every layer's K and V, in
    # the graph's KV dtype (read from a one-token probe).
    probe = generator(2)
    probe.append_tokens(reference[:1])
    kv_dtype = probe.get_output("present.0.key").dtype
    del probe
    precision = args.precision or _precision(model_dir, decoder_config["filename"]) or {
        "float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(str(kv_dtype), str(kv_dtype))
    kv_bytes_per_token = (2 * decoder_config["num_hidden_layers"] * decoder_config["num_key_value_heads"]
                          * decoder_config["head_size"] * np.dtype(kv_dtype).itemsize)
    positions = max([n + 1 for n in lengths] + [DECODE_PROMPT + decode_tokens + 1])
    size = sum(f.stat().st_size for f in model_dir.iterdir() if f.is_file())  # graph, weights, tokenizer, configs
    serve_worker({"name": f"onnxruntime-genai {precision}", "path": str(model_dir), "profile": "onnxruntime-genai",
                  "load_s": load_s, "size_mb": size / 1e6, "prompt_lengths": lengths,
                  "kv_cache_mb": kv_bytes_per_token * positions / 1e6}, repetition)


if __name__ == "__main__":
    main()
