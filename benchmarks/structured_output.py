"""How often SmolLM2 writes valid JSON for a schema, free and constrained (docs/serving.md).

    python benchmarks/structured_output.py dist/smollm2-int8 --samples 20 --temperature 0.7

For each seed, the same chat prompt is answered twice: unconstrained, and with json_schema=.
Counts the answers that parse as JSON and those that validate against the schema (jsonschema),
and the time per answer."""

from __future__ import annotations

import argparse
import json
import platform
import time

import jsonschema

import edgelm_runtime as er
from tests.e2e.test_smollm2 import ORDER

ASK = [{"role": "user", "content": "Ann Smith from Oslo paid for 2 lamps and 1 desk, 340 euros in all. Write the order "
                                   "as JSON with the keys customer (name, city), items (product, quantity), total and "
                                   "status (new, paid or shipped)."}]


def _cpu() -> str:
    try:
        lines = open("/proc/cpuinfo", encoding="utf-8").read().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--temperature", type=float, default=0.7)
    args = parser.parse_args()
    llm = er.load_bundle(args.bundle)
    rows = {}
    for mode in ("free", "json_schema"):
        parsed = valid = 0
        seconds = []
        for seed in range(args.samples):
            start = time.perf_counter()
            extra = {"json_schema": ORDER} if mode == "json_schema" else {}
            text = llm.chat(ASK, max_new_tokens=200, temperature=args.temperature, seed=seed, **extra)
            seconds.append(time.perf_counter() - start)
            body = text.strip().removeprefix("```json").removesuffix("```").strip()  # a fenced block counts too
            try:
                data = json.loads(body)
            except ValueError:
                continue
            parsed += 1
            try:
                jsonschema.validate(data, ORDER)
                valid += 1
            except jsonschema.ValidationError:
                pass
        rows[mode] = {"parsed": parsed, "valid": valid, "n": args.samples,
                      "median_s": sorted(seconds)[len(seconds) // 2]}
    print(json.dumps({"bundle": llm.manifest.name, "host": _cpu(),
                      "temperature": args.temperature, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
