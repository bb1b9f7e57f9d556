"""OUT/matrix.json and what is read from it: each cell's status and numbers, the gates, the best
bundle per device, the summary table and the Pareto plot. `edgelm matrix --report OUT` renders
these from the file alone, without Ray."""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgelm.errors import ConfigError

RESULTS = "matrix.json"
PLOT = "pareto.png"
FORMAT = 1
# gate field -> (number it reads, True when the number must stay at or under the gate)
_GATES = {"max_perplexity_ratio": ("perplexity_ratio", True), "min_top1_agreement": ("top1_agreement", False),
          "max_kl_divergence": ("kl_divergence", True), "min_chat_identical": ("chat_identical", False),
          "max_size_mb": ("size_mb", True), "max_accuracy_drop": ("accuracy_drop", True)}


def read_results(output: Path) -> dict[str, dict[str, Any]]:
    """An earlier run's cell records by hash ({} when there is none)."""
    path = output / RESULTS
    if not path.is_file():
        return {}
    return {cell["hash"]: cell for cell in load_results(output)["cells"]}


def load_results(output: Path) -> dict[str, Any]:
    path = Path(output) / RESULTS
    if not path.is_file():
        raise ConfigError(f"{path}: not found", hint="pass the -o folder of an edgelm matrix run")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: unreadable ({exc})", hint="rerun the matrix to write it again") from None
    if not isinstance(data, dict) or not isinstance(data.get("cells"), list):
        raise ConfigError(f"{path}: no cells list (not written by edgelm matrix)", hint="pass an edgelm matrix -o folder")
    if not isinstance(data.get("format"), int) or data["format"] > FORMAT:
        raise ConfigError(f"{path}: format {data.get('format')!r}, this edgelm reads format {FORMAT}",
                          hint="read it with the edgelm that wrote it, or rerun the matrix into a new -o")
    return data


def write_results(output: Path, results: dict[str, Any]) -> None:
    """matrix.json, replaced in one rename: a reader never sees half of it."""
    output.mkdir(parents=True, exist_ok=True)
    partial = output / f".{RESULTS}.partial"
    partial.write_text(json.dumps({"format": FORMAT, **results}, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(partial, output / RESULTS)


def cell_status(record: dict[str, Any], run: list[str] | tuple[str, ...], devices: list[str]) -> str:
    """queued / submitted (to Ray) / running (eval or bench still to come) / done / failed."""
    if "build" not in record:
        return record.get("status", "queued") if record.get("status") in ("queued", "submitted") else "queued"
    steps = [record["build"]] + ([record["eval"]] if "eval" in record else []) + list(record["bench"].values())
    if any(step.get("status") == "failed" for step in steps):
        return "failed"
    missing = ("eval" in run and "eval" not in record) or any(device not in record["bench"] for device in devices)
    return "running" if missing else "done"


def cell_numbers(record: dict[str, Any], device: str | None = None) -> dict[str, Any]:
    """A cell's numbers in one flat mapping: the build's, eval's and one device's bench."""
    build = record.get("build", {})
    numbers = {key: build.get(key) for key in ("size_mb", "perplexity_ratio", "top1_agreement", "kl_divergence",
                                               "chat_identical", "chat_prefix", "seconds", "peak_rss_mb")}
    numbers["accuracy_drop"] = record.get("eval", {}).get("accuracy_drop")
    bench = record.get("bench", {}).get(device, {}) if device else {}
    for key in ("decode_tokens_per_s", "decode_min", "decode_max", "prefill_tokens_per_s"):
        numbers[key] = bench.get(key)
    numbers["ttft_128_ms"] = bench.get("ttft_ms", {}).get("128")
    return numbers


def gate_misses(numbers: dict[str, Any], gates: dict[str, Any]) -> list[str]:
    misses = []
    for gate, limit in gates.items():
        key, at_most = _GATES[gate]
        value = numbers.get(key)
        if value is None:
            misses.append(f"{key} not measured")
        elif (value > limit) if at_most else (value < limit):
            misses.append(f"{key} {value:.4g} {'>' if at_most else '<'} {limit}")
    return misses


def finish(results: dict[str, Any], spec: Any, wall_s: float) -> dict[str, Any]:
    """The end of a run: each cell's gate verdict, the best bundle per device, the counts."""
    gates = spec.gates.model_dump(exclude_none=True)
    for record in results["cells"]:
        record["gate_misses"] = gate_misses(cell_numbers(record), gates) if record["status"] == "done" else None
    counts: dict[str, int] = {}
    for record in results["cells"]:
        counts[record["status"]] = counts.get(record["status"], 0) + 1
    return {"finished": datetime.now(timezone.utc).isoformat(timespec="seconds"), "wall_s": round(wall_s, 1),
            "counts": counts, "best": best_per_device(results, "bench" in spec.run)}


def best_per_device(results: dict[str, Any], benched: bool) -> dict[str, Any]:
    """Per device: the fastest bundle there that passes the gates (the smallest, without bench)."""
    best: dict[str, Any] = {}
    for device in results.get("devices", []):
        passing = [r for r in results["cells"] if r["status"] == "done" and not r.get("gate_misses")
                   and (not benched or r["bench"].get(device, {}).get("status") == "done")]
        if not passing:
            best[device] = None
            continue
        if benched:
            pick = max(passing, key=lambda r: r["bench"][device]["decode_tokens_per_s"])
        else:
            pick = min(passing, key=lambda r: r["build"]["size_mb"])
        numbers = cell_numbers(pick, device if benched else None)
        best[device] = {"cell": pick["id"], "bundle": pick["bundle"], "size_mb": numbers["size_mb"],
                        "perplexity_ratio": numbers["perplexity_ratio"], "decode_tokens_per_s": numbers["decode_tokens_per_s"]}
    return best


def summary_table(results: dict[str, Any]) -> Any:
    """One row per cell; bench columns per device. Plain enough to read in a pipe."""
    from rich.markup import escape
    from rich.table import Table

    devices = [d for d in results.get("devices", []) if any(d in r.get("bench", {}) for r in results["cells"])]
    table = Table(title=f"matrix {results.get('matrix')}: {_counts(results)}", title_justify="left")
    for column in ("cell", "status", "MB", "ppl ratio", "top-1", "chat same", "build s", "build GiB"):
        table.add_column(column, justify="left" if column in ("cell", "status") else "right")
    for device in devices:
        table.add_column(f"decode tok/s {device}", justify="right")
        table.add_column(f"TTFT128 ms {device}", justify="right")
    table.add_column("gates")
    for record in results["cells"]:
        n = cell_numbers(record)
        row = [escape(record["id"]) + (" (reused)" if record.get("reused") else ""), record["status"], _fmt(n["size_mb"], 0),
               _fmt(n["perplexity_ratio"], 3), _fmt(n["top1_agreement"], 3), _fmt(n["chat_identical"], 2),
               _fmt(n["seconds"], 0), _fmt(n["peak_rss_mb"] and n["peak_rss_mb"] / 1024, 1)]
        for device in devices:
            d = cell_numbers(record, device)
            spread = f" ({d['decode_min']:.0f}-{d['decode_max']:.0f})" if d["decode_min"] is not None else ""
            row += [_fmt(d["decode_tokens_per_s"], 1) + spread, _fmt(d["ttft_128_ms"], 0)]
        misses = record.get("gate_misses")
        row.append("-" if misses is None else ("pass" if not misses else escape("miss: " + "; ".join(misses))))
        table.add_row(*row)
    return table


def failures(results: dict[str, Any]) -> list[str]:
    """One line per failed step: `cell (step): error`."""
    lines = []
    for record in results["cells"]:
        steps = [("build", record.get("build")), ("eval", record.get("eval"))] + \
                [(f"bench on {device}", result) for device, result in record.get("bench", {}).items()]
        lines += [f"{record['id']} ({name}): {step.get('error')}" for name, step in steps
                  if step and step.get("status") == "failed"]
    return lines


def best_lines(results: dict[str, Any]) -> list[str]:
    lines = []
    for device, pick in (results.get("best") or {}).items():
        if pick is None:
            lines.append(f"{device}: no bundle passes the gates")
            continue
        speed = f", {pick['decode_tokens_per_s']:.1f} tok/s" if pick.get("decode_tokens_per_s") else ""
        lines.append(f"{device}: {pick['cell']} ({pick['size_mb']:.0f} MB, ppl ratio {_fmt(pick['perplexity_ratio'], 3)}"
                     f"{speed}) -> {pick['bundle']}")
    return lines


def pareto_plot(results: dict[str, Any], path: Path) -> Path | None:
    """Size against perplexity ratio, one panel per benched device, colour = decode tok/s; the
    Pareto front (no other bundle is smaller, closer to fp32 and faster) is ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    devices = [d for d in results.get("devices", []) if any(d in r.get("bench", {}) for r in results["cells"])] or [None]
    done = [r for r in results["cells"] if r.get("build", {}).get("status") == "done"]
    if not done:
        return None
    figure, axes = plt.subplots(1, len(devices), figsize=(6.5 * len(devices), 4.8), squeeze=False)
    for axis, device in zip(axes[0], devices):
        points = [(r["id"], cell_numbers(r, device)) for r in done]
        points = [(label, n) for label, n in points if n["perplexity_ratio"] is not None]
        speeds = [n["decode_tokens_per_s"] for _, n in points]
        colour = speeds if all(s is not None for s in speeds) else None
        scatter = axis.scatter([n["size_mb"] for _, n in points], [n["perplexity_ratio"] for _, n in points], c=colour,
                               cmap="viridis", s=60, zorder=3)
        if colour is not None:
            figure.colorbar(scatter, ax=axis, label="decode tok/s (median)")
        front = {label for label, _ in _front(points)}
        sizes = [n["size_mb"] for _, n in points]
        edge = min(sizes) + 0.75 * (max(sizes) - min(sizes))  # labels of the largest bundles go to their left
        models = {label.split("/")[0] for label, _ in points}
        for label, n in points:
            xy, right_half = (n["size_mb"], n["perplexity_ratio"]), n["size_mb"] > edge
            shown = label.split("/", 1)[1] if len(models) == 1 else label  # one model: its name is in the title
            if label in front:
                axis.scatter(*zip(xy), s=160, facecolors="none", edgecolors="crimson", zorder=4)
            axis.annotate(shown, xy, textcoords="offset points", xytext=(-7 if right_half else 7, 5), fontsize=7,
                          ha="right" if right_half else "left", color="black" if label in front else "dimgray")
        axis.margins(0.12)
        axis.set_xlabel("bundle size (MB)")
        axis.set_ylabel("perplexity ratio vs fp32")
        model = f", {next(iter(models))}" if len(models) == 1 else ""
        axis.set_title(f"{results.get('matrix')}{model}" + (f" on {device}" if device else "") + " (ringed: Pareto front)",
                       fontsize=9)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _front(points: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, dict[str, Any]]]:
    def key(n: dict[str, Any]) -> tuple[float, float, float]:
        return n["size_mb"], n["perplexity_ratio"], -(n["decode_tokens_per_s"] or 0.0)

    def dominated(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
        return all(y <= x for x, y in zip(a, b)) and any(y < x for x, y in zip(a, b))

    return [(label, n) for label, n in points if not any(dominated(key(n), key(m)) for _, m in points if m is not n)]


def _counts(results: dict[str, Any]) -> str:
    counts: dict[str, int] = {}
    for record in results["cells"]:
        counts[record["status"]] = counts.get(record["status"], 0) + 1
    return ", ".join(f"{count} {status}" for status, count in sorted(counts.items()))


def _fmt(value: Any, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
