"""Build one model pruned by several amounts (with and without recovery) for one profile, bench
every bundle in one interleaved run, and print the table the README shows: parameters, bundle
size, decode tokens/s (and its ratio to the unpruned bundle), perplexity of the pruned fp32 model
and of the bundle, and the bundle's ratio to the unpruned fp32 model.

    python benchmarks/prune_sweep.py -o work/sweep --profile cpu-int8 \\
        --fractions 0,0.1,0.25,0.4 --recover-steps 300 [--repeats 5] [--json sweep.json]

The first fraction should be 0 (the baseline: pruning nothing is the identity). Recovery runs for
every fraction above 0. The builds' quality gates compare the quantized bundle with the *pruned*
fp32 model; they are relaxed to ratio 1.5 / top-1 0.5 here (the sweep measures what pruning costs;
each bundle's int8 fidelity against its pruned fp32 model is still in its manifest's quality)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, required=True, help="folder for the bundles")
    parser.add_argument("--profile", default="cpu-int8")
    parser.add_argument("--model", default="default")
    parser.add_argument("--fractions", default="0,0.1,0.25,0.4")
    parser.add_argument("--recover-steps", type=int, default=300, help="0: no recovered variants")
    parser.add_argument("--recover-method", default="lora", choices=("lora", "full"))
    parser.add_argument("--variant", action="append", default=[], help='more bundles: "name: {prune section}"')
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from edgelm import api
    from edgelm_runtime.bench import bench
    from edgelm_runtime.bundle import read_manifest

    args.output.mkdir(parents=True, exist_ok=True)
    variants = []
    for fraction in (float(f) for f in args.fractions.split(",")):
        variants.append((f"mlp{fraction:g}", {"kind": "structured", "mlp_fraction": fraction}))
        if fraction > 0 and args.recover_steps:
            variants.append((f"mlp{fraction:g}-recovered", {"kind": "structured", "mlp_fraction": fraction,
                                                            "recover": {"steps": args.recover_steps,
                                                                        "method": args.recover_method}}))
    for spec in args.variant:
        name, _, body = spec.partition(":")
        variants.append((name.strip(), yaml.safe_load(body)))
    bundles = []
    for name, prune in variants:
        bundle = args.output / name
        if not (bundle / "manifest.json").is_file():
            recipe = args.output / f"{name}.yaml"
            recipe.write_text(yaml.safe_dump({"prune": prune, "quality": {"max_perplexity_ratio": 1.5,
                                                                          "min_top1_agreement": 0.5}}))
            print(f"building {name} ...", flush=True)
            api.build(api.plan_build(profile=args.profile, recipe=recipe, model=args.model, name=name), bundle)
        bundles.append(bundle)
    timings = {Path(row["path"]).name: row for row in bench(bundles, threads=args.threads, repeats=args.repeats)["bundles"]}
    rows = []
    for bundle in bundles:
        manifest = read_manifest(bundle)
        pruning, speed = manifest.pruning, timings[bundle.name]
        recovered = pruning.get("recovery", {}).get("perplexity_after")
        rows.append({"variant": bundle.name, "params_m": round(pruning["params_after"] / 1e6, 1),
                     "bundle_mb": pruning["bundle_mb"], "decode_tokens_per_s": round(speed["decode_tokens_per_s"], 1),
                     "decode_ratio": round(speed["decode_ratio_vs_first"], 3), "ttft_128_ms": round(speed["ttft_ms"]["128"], 1),
                     "fp32_perplexity": recovered or pruning["perplexity_pruned"],
                     "bundle_perplexity": round(manifest.quality["perplexity"], 3),
                     "bundle_ratio_vs_unpruned": pruning["bundle_perplexity_ratio_vs_unpruned"],
                     "nonzero_params_m": round(pruning["nonzero_params_after"] / 1e6, 1),
                     "compressed_mb": pruning["compressed_mb"],
                     "recovery_seconds": pruning.get("recovery", {}).get("seconds")})
    print(f"\n{'variant':22} {'params M':>8} {'MB':>6} {'zlib MB':>7} {'tok/s':>7} {'x':>6} {'fp32 ppl':>9} "
          f"{'bundle ppl':>10} {'vs unpruned':>11}")
    for r in rows:
        print(f"{r['variant']:22} {r['params_m']:8.1f} {r['bundle_mb']:6.1f} {r['compressed_mb']:7.1f} {r['decode_tokens_per_s']:7.1f} "
              f"{r['decode_ratio']:6.3f} {r['fp32_perplexity']:9.2f} {r['bundle_perplexity']:10.2f} "
              f"{r['bundle_ratio_vs_unpruned']:11.3f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
