"""Compare quantization variants of one fp32 bundle: fidelity and decode speed, in one run.

    python benchmarks/quant_sweep.py dist/smollm2-fp32 -o work/sweep \\
        --variant "int8-l4: {mode: weight-only, bits: 8, accuracy_level: 4}" \\
        --variant "int4-rtn-sym: {mode: weight-only, bits: 4, symmetric: true}"

Each variant is a profile `quantization:` block (weight-only modes; static QDQ needs calibration,
so build those with `edgelm build`). The fp32 bundle's graph (already exported and fused) is
quantized with the same code `edgelm build` runs, written as a bundle beside the others, and
measured through edgelm-runtime against the fp32 bundle on the build's held-out windows:
perplexity ratio, top-1 agreement, KL. Decode speed: `edgelm bench`'s measurement
(edgelm_runtime.bench), interleaved over all bundles (the fp32 bundle first), median of --repeats."""

from __future__ import annotations

import argparse
import dataclasses
import shutil
from pathlib import Path

import onnx
import yaml

import edgelm_runtime as er
from edgelm.config.profile import WeightOnly
from edgelm.eval.metrics import compare
from edgelm.eval.text import eval_windows
from edgelm.quant.graph import save_external
from edgelm.quant.matmul_nbits import quantize_weight_only, select_matmuls
from edgelm_runtime.bundle import describe_files, read_manifest, write_manifest
from edgelm_runtime.bench import bench


def quantized_bundle(reference: Path, settings: WeightOnly, dest: Path) -> Path:
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(reference, dest, ignore=shutil.ignore_patterns("model.onnx", "model.onnx.data"))
    graph = onnx.load(str(reference / "model.onnx"), load_external_data=True)
    matmuls, int8, _, _ = select_matmuls(graph, settings)
    save_external(quantize_weight_only(graph, settings, matmuls, int8), dest / "model.onnx")
    manifest = read_manifest(dest)
    write_manifest(dest, dataclasses.replace(manifest, name=dest.name, files=describe_files(dest)))
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reference", type=Path, help="an fp32 bundle (edgelm build --profile cpu-fp32)")
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--variant", action="append", default=[], help='"name: {quantization block}"')
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--window-len", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    bundles = {"fp32": args.reference}
    for spec in args.variant:
        name, block = spec.split(":", 1)
        settings = WeightOnly.model_validate(yaml.safe_load(block))
        print(f"quantizing {name} ...", flush=True)
        bundles[name] = quantized_bundle(args.reference, settings, args.output / name)

    reference = er.load_bundle(args.reference)
    encode = lambda text: reference.tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    windows = eval_windows("builtin", args.windows, args.window_len, encode)
    rows = {}
    for name, path in bundles.items():
        candidate = er.load_bundle(path)
        size = sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) / 1e6
        rows[name] = {"size_mb": size, **compare(candidate, reference, windows)}
        print(f"measured {name}: ratio {rows[name]['perplexity_ratio']:.4f}", flush=True)

    speeds = {}
    if args.repeats:
        result = bench(list(bundles.values()), args.threads, args.repeats, decode_tokens=args.tokens)
        speeds = {name: row["detail"]["decode_tokens_per_s"] for name, row in zip(bundles, result["bundles"])}
    base = speeds["fp32"]["median"] if speeds else None
    print(f"\n{len(windows)} x {args.window_len} held-out tokens; decode: {args.tokens} tokens, "
          f"{args.repeats} interleaved repeats, {args.threads} threads")
    print("| variant | perplexity | ratio | top-1 | KL | MB | decode tok/s median (min-max) | vs fp32 |")
    print("|---|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        speed = "not measured | -"
        if speeds:
            s = speeds[name]
            speed = f"{s['median']:.1f} ({s['min']:.1f}-{s['max']:.1f}) | x{s['median'] / base:.2f}"
        print(f"| {name} | {row['perplexity']:.2f} | {row['perplexity_ratio']:.4f} | {row['top1_agreement']:.3f} | "
              f"{row['kl_divergence']:.4f} | {row['size_mb']:.0f} | {speed} |")


if __name__ == "__main__":
    main()
