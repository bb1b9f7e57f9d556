"""The runtime-adapter measurements of docs/recipes-and-adapters.md, on bundles you built.

    python benchmarks/runtime_adapters.py copies ADAPTER_DIR OUT_PREFIX     # 4 more adapters of its shape
    python benchmarks/runtime_adapters.py switch RUNTIME_BUNDLE MERGED_BUNDLE ADAPTER
    python benchmarks/runtime_adapters.py accuracy RUNTIME_BUNDLE MERGED_BUNDLE ADAPTER

copies: every tensor of ADAPTER_DIR scaled by a seeded factor in [0.5, 1.5] (not trained adapters:
they measure size and switching, not quality). switch: first use of each adapter (sha256 + load),
switching between loaded ones, and one decode step without, with the adapter and on the merged
bundle. accuracy: zero-shot sentiment accuracy on 500 held-out sentences (edgelm.eval's task
suite) of the merged bundle, the runtime bundle with ADAPTER, and without it.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import edgelm_runtime as er
from edgelm_runtime.hardware import cpu_model


def copies(source: Path, prefix: str) -> None:
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(source / "adapter_model.safetensors"))
    for index in range(2, 6):
        out = Path(f"{prefix}{index}")
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        shutil.copy(source / "adapter_config.json", out)
        rng = np.random.default_rng(index)
        save_file({k: (v * rng.uniform(0.5, 1.5, v.shape)).astype(v.dtype) for k, v in tensors.items()},
                  str(out / "adapter_model.safetensors"))
        print(out)


def switch(runtime: Path, merged: Path, adapter: str) -> dict:
    llm = er.load_bundle(runtime)
    ids = llm.tokenizer.encode("Review: a fine, moving film.\nSentiment (positive or negative):", True)
    first = {}
    for name in llm.adapters:
        start = time.perf_counter()
        llm.with_adapter(name)
        first[name] = round(1000 * (time.perf_counter() - start), 2)
    again = []
    for _ in range(200):
        for name in [*llm.adapters, None]:
            start = time.perf_counter()
            llm.with_adapter(name)
            again.append(1000 * (time.perf_counter() - start))

    def step(model: er.LanguageModel) -> float:
        stepper = model.decoder.stepper(len(ids) + 2)
        stepper.feed(np.asarray(ids, dtype=np.int64))
        start = time.perf_counter()
        stepper.feed(np.asarray([ids[-1]], dtype=np.int64))
        return 1000 * (time.perf_counter() - start)

    return {"first_use_ms": first, "switch_ms_median": statistics.median(again), "switch_ms_max": max(again),
            "step_ms_base": statistics.median(step(llm) for _ in range(10)),
            "step_ms_adapter": statistics.median(step(llm.with_adapter(adapter)) for _ in range(10)),
            "step_ms_merged": statistics.median(step(er.load_bundle(merged)) for _ in range(10))}


def accuracy(runtime: Path, merged: Path, adapter: str) -> dict:
    from edgelm.eval.task_data import load_task
    from edgelm.eval.tasks import task_accuracy

    task = load_task("sentiment", 500, 0)
    out = {}
    for label, bundle, name in (("merged", merged, None), ("runtime + adapter", runtime, adapter),
                                ("runtime, no adapter", runtime, None)):
        llm = er.load_bundle(bundle).with_adapter(name)
        [result] = task_accuracy(task, 0, lambda text: llm.tokenizer.encode(text, add_special_tokens=False),
                                 [llm.continuation_logprobs], llm.manifest.max_seq_len, "plain", llm.render_chat)
        out[label] = round(result["default"], 4)
    return out


def main() -> None:
    what, *args = sys.argv[1:] or ["--help"]
    if what == "copies" and len(args) == 2:
        return copies(Path(args[0]), args[1])
    if what in ("switch", "accuracy") and len(args) == 3:
        result = (switch if what == "switch" else accuracy)(Path(args[0]), Path(args[1]), args[2])
        print(json.dumps({"host": cpu_model(), what: result}, indent=2))
        return
    raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
