"""Perplexity of pruning variants in PyTorch fp32, before any export: the choice of importance,
allocation, bias compensation and fraction, each applied by edgelm's own Prune stage to a fresh
copy of the model and measured on the build's held-out windows.

    python benchmarks/prune_variants.py [--model default] \\
        --variant "wanda: {mlp_fraction: 0.25}" \\
        --variant "magnitude: {mlp_fraction: 0.25, importance: magnitude}" \\
        --variant "wanda+comp: {mlp_fraction: 0.25, compensate: true}"

Each variant is a recipe `prune:` section (recover: included, if given)."""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import yaml


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--variant", action="append", required=True, help='"name: {prune section}"')
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    from edgelm import api
    from edgelm.pipeline.stage import BuildState, no_progress
    from edgelm.stages.load.model import LoadModel
    from edgelm.stages.compress.prune import Prune

    results = []
    with tempfile.TemporaryDirectory(prefix="prune-variants-") as scratch:
        base = None
        for spec in args.variant:
            name, _, body = spec.partition(":")
            recipe = Path(scratch) / "r.yaml"
            recipe.write_text(yaml.safe_dump({"prune": yaml.safe_load(body) or {}}))
            state = BuildState(plan=api.plan_build(profile="cpu-fp32", recipe=recipe, model=args.model), work_dir=Path(scratch),
                               bundle_dir=Path(scratch))
            if base is None:
                LoadModel().run(state, no_progress)
                base = (state.model, state.tokenizer, state.chat_template, state.max_seq_len, state.source)
            state.model = copy.deepcopy(base[0])
            state.tokenizer, state.chat_template, state.max_seq_len, state.source = base[1:]
            start = time.perf_counter()
            facts = Prune().run(state, no_progress)
            result = {"variant": name.strip(), "params_after": facts["params_after"],
                      "perplexity_before": facts["perplexity_before"], "perplexity_pruned": facts["perplexity_pruned"],
                      "perplexity_recovered": facts.get("recovery", {}).get("perplexity_after"),
                      "ratio_vs_unpruned": facts["perplexity_ratio_vs_unpruned"], "mlp_channels": facts.get("mlp_channels"),
                      "seconds": round(time.perf_counter() - start, 1)}
            results.append(result)
            print(json.dumps(result), flush=True)
    print(f"\n{'variant':28} {'params M':>9} {'ppl pruned':>11} {'recovered':>10} {'ratio':>7}")
    for r in results:
        recovered = f"{r['perplexity_recovered']:10.2f}" if r["perplexity_recovered"] else f"{'-':>10}"
        print(f"{r['variant']:28} {r['params_after'] / 1e6:9.1f} {r['perplexity_pruned']:11.2f} {recovered} "
              f"{r['ratio_vs_unpruned']:7.3f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
