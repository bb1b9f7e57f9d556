"""What a Ray worker runs for one cell: build, eval or bench. Each returns a small record (status,
numbers, where it ran) that comes back through Ray; bundles stay on the shared OUT folder.

A cell's own failure (a gate missed, a model that does not export, a bug in a stage) is never
raised: it becomes the record's one line, and the other cells go on. Ray retries only a worker
that died (killed, out of memory); the build's atomic workspace means a dead worker never leaves a
half-written bundle, and its temporary folder is removed by the next build beside it."""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path
from typing import Any

from edgelm_runtime.errors import EdgelmRuntimeError


def build_cell(payload: dict[str, Any]) -> dict[str, Any]:
    """Build the cell's plan into its bundle folder (replacing a bundle of an older plan)."""
    from edgelm import api
    from edgelm.config.plan import BuildPlan

    started = time.monotonic()
    record = {**_where(), "attempt": _count_attempt(Path(payload["attempts"]))}
    try:
        plan = BuildPlan.model_validate(payload["plan"])
        report = api.build(plan, payload["bundle"], force=True)
    except Exception as exc:  # noqa: BLE001 (recorded: one cell's failure must not stop the matrix)
        return {**record, "status": "failed", "error": one_line(exc), "seconds": round(time.monotonic() - started, 1)}
    return {**record, "status": "done", "seconds": round(time.monotonic() - started, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),  # one build per worker
            "stage_seconds": {name: round(seconds, 2) for name, seconds in report.seconds.items()},
            **bundle_numbers(Path(payload["bundle"]))}


def eval_cell(payload: dict[str, Any], build: dict[str, Any]) -> dict[str, Any]:
    """Task accuracy of the cell's bundle against its fp32 source (`edgelm eval`)."""
    from edgelm import api

    if build.get("status") != "done":
        return {"status": "skipped", "error": "the build did not finish"}
    settings = payload["eval"]
    record = _where()
    try:
        report = api.evaluate(payload["bundle"], tasks=settings["tasks"], samples=settings["samples"],
                              shots=settings["shots"], chat_prompts=0, check=False)
    except Exception as exc:  # noqa: BLE001
        return {**record, "status": "failed", "error": one_line(exc)}
    tasks = {name: {"accuracy": task["accuracy"], "reference_accuracy": task["reference_accuracy"]}
             for name, task in report.result["tasks"].items()}
    drops = [task["reference_accuracy"] - task["accuracy"] for task in tasks.values()]
    return {**record, "status": "done", "tasks": tasks, "accuracy_drop": round(max(drops), 4) if drops else None}


def bench_cell(payload: dict[str, Any], build: dict[str, Any], device: str) -> dict[str, Any]:
    """`edgelm bench` of the cell's bundle on the node Ray placed this task on (the device's)."""
    from edgelm_runtime.bench import bench

    if build.get("status") != "done":
        return {"status": "skipped", "error": "the build did not finish"}
    settings = payload["bench"]
    record = {**_where(), "device": device}
    try:
        result = bench([payload["bundle"]], settings["threads"], settings["repeats"], settings["warmup"],
                       settings["decode_tokens"])
    except Exception as exc:  # noqa: BLE001
        return {**record, "status": "failed", "error": one_line(exc)}
    row = result["bundles"][0]
    decode = row["detail"]["decode_tokens_per_s"]
    return {**record, "status": "done", "decode_tokens_per_s": round(decode["median"], 2),
            "decode_min": round(decode["min"], 2), "decode_max": round(decode["max"], 2),
            "prefill_tokens_per_s": round(row["prefill_tokens_per_s"], 1),
            "ttft_ms": {length: round(ms, 1) for length, ms in row["ttft_ms"].items()},
            "peak_rss_mb": round(row["peak_rss_mb"]), "cpu": result["machine"]["cpu"],
            "cores": result["machine"]["cores"], "settings": result["settings"]}


def bundle_numbers(bundle: Path) -> dict[str, Any]:
    """Size and the build's proven quality, from the bundle's manifest."""
    from edgelm_runtime.bundle import read_manifest

    manifest = read_manifest(bundle)
    quality, chat = manifest.quality or {}, (manifest.quality or {}).get("chat") or {}
    # a pruned bundle's own check is against the pruned fp32 model; cells compare against the source
    unpruned = (manifest.pruning or {}).get("bundle_perplexity_ratio_vs_unpruned")
    return {"size_mb": round(sum(entry.size for entry in manifest.files.values()) / 1e6, 1),
            "perplexity_ratio": unpruned or quality.get("perplexity_ratio"),
            "check_perplexity_ratio": quality.get("perplexity_ratio"), "top1_agreement": quality.get("top1_agreement"),
            "kl_divergence": quality.get("kl_divergence"), "chat_identical": chat.get("identical"),
            "chat_prefix": chat.get("mean_prefix")}


def one_line(exc: BaseException) -> str:
    """An error as the CLI would print it: the message, then the hint."""
    if isinstance(exc, EdgelmRuntimeError):
        return exc.message + (f" (hint: {exc.hint})" if exc.hint else "")
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:500]


def _count_attempt(path: Path) -> int:
    """This build's attempt number: a retried task (its worker died) finds the count it left."""
    path.parent.mkdir(parents=True, exist_ok=True)
    attempt = (int(path.read_text()) if path.is_file() else 0) + 1
    path.write_text(str(attempt))
    return attempt


def _where() -> dict[str, Any]:
    """The Ray node and host that ran the task."""
    import socket

    ray = sys.modules.get("ray")
    node = ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else None
    return {"node": node, "hostname": socket.gethostname()}
