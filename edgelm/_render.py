"""Rich rendering for the CLI: live stage progress and the end-of-build summary table."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from edgelm.pipeline.results import from_record, size_split_note
from edgelm_runtime.bundle import Manifest


def quiet_libraries() -> None:
    """Keep the rich progress readable: the libraries' own bars and warnings go to the log only."""
    import logging
    import os
    import warnings

    import torch
    import transformers

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch._logging.set_logs(all=logging.ERROR)
    for name in ("torch", "onnxscript", "onnx_ir", "root"):
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime.quantization logs on the root logger


class BuildProgress:
    """One progress row per stage; `update` is the pipeline's progress callback."""

    def __init__(self, console: Console, stages: Sequence[Any]) -> None:
        self._progress = Progress(SpinnerColumn(), TextColumn("{task.description:<58}"), BarColumn(),
                                  TextColumn("{task.fields[note]}"), TimeElapsedColumn(), console=console, transient=False)
        self._titles = {s.name: s.title for s in stages}
        self._tasks: dict[str, TaskID] = {}

    def __enter__(self) -> BuildProgress:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.__exit__(*exc)

    def update(self, stage: str, completed: float, total: float | None, message: str) -> None:
        if stage not in self._tasks:
            self._tasks[stage] = self._progress.add_task(self._titles.get(stage, stage), total=None, note="")
        task = self._tasks[stage]
        done = total is not None and completed >= total and message == self._titles.get(stage)
        self._progress.update(task, completed=completed, total=total,
                              note="" if done or message == self._titles.get(stage) else message)


class StepProgress(BuildProgress):
    """BuildProgress for free-form steps (edgelm eval): each new step name gets its own row."""

    def __init__(self, console: Console) -> None:
        super().__init__(console, ())


class BenchProgress:
    """One bar for edgelm bench; `update` is the runtime bench's progress callback."""

    def __init__(self, console: Console, transient: bool = False) -> None:
        self._progress = Progress(TextColumn("{task.description:<40}"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), console=console, transient=transient)
        self._task = self._progress.add_task("loading bundles", total=None)

    def __enter__(self) -> BenchProgress:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.__exit__(*exc)

    def update(self, what: str, done: float, total: float | None) -> None:
        self._progress.update(self._task, description=what, completed=done, total=total)


def _keep_digits(table: Table) -> Table:
    """A column too narrow folds its cells onto more lines instead of cutting them to `22…`."""
    for column in table.columns:
        if not column.no_wrap:
            column.overflow = "fold"
    return table


def eval_table(result: dict[str, Any]) -> Table:
    table = Table("metric", "bundle", "reference", title=f"edgelm eval: {result['bundle']} vs {result['reference']}")
    table.add_row("perplexity", f"{result['perplexity']:.3f}", f"{result['reference_perplexity']:.3f}")
    table.add_row("perplexity ratio", f"{result['perplexity_ratio']:.4f}", "1")
    table.add_row("top-1 agreement", f"{result['top1_agreement']:.4f}", "1")
    table.add_row("KL divergence (nats/token)", f"{result['kl_divergence']:.5f}", "0")
    chat = result.get("chat")
    if chat:
        where = f"{chat['prompts']} prompts x {chat['tokens']} tokens"
        table.add_row(f"chat answers identical ({where})", f"{chat['identical']:.3f}", "1")
        table.add_row("chat mean common prefix / first token", f"{chat['mean_prefix']:.3f} / {chat['first_token']:.3f}", "1 / 1")
        table.add_row("chat KL mean / p99 / max", f"{chat['kl_mean']:.4f} / {chat['kl_p99']:.3f} / {chat['kl_max']:.3f}", "0")
        table.add_row("chat same top-1 / RMS Δp", f"{chat['same_top1']:.3f} / {chat['rms_delta_p']:.3f}", "1 / 0")
    for name, task in result["tasks"].items():
        table.add_row(f"{name} accuracy (n={task['n']})", f"{task['accuracy']:.3f}", f"{task['reference_accuracy']:.3f}")
    table.caption = f"{result['tokens']} tokens in {result['windows']} windows of {result['window_len']}"
    return _keep_digits(table)


def bench_table(result: dict[str, Any]) -> Table:
    """One row per bundle: medians (min-max for decode), and the decode ratio against the first."""
    rows = result["bundles"]
    # every length any bundle measured; a prompt longer than a bundle's window (npu-qdq) reads "-"
    lengths = sorted({n for row in rows for n in row["ttft_ms"]}, key=int)
    table = Table("bundle", "MB", "load s", "RSS MB", f"TTFT ms {'/'.join(lengths)}", "prefill tok/s",
                  "decode tok/s", "model only", "µs/tok rest", "µs/tok grammar", "ratio", title="edgelm bench")
    table.columns[0].no_wrap = True
    for row in rows:
        detail = row["detail"]
        decode = detail["decode_tokens_per_s"]
        rest = detail["sampling_us"]["median"] + detail["detokenize_us"]["median"]
        table.add_row(row["name"], f"{row['size_mb']:.0f}", f"{row['load_s']:.2f}", f"{row['peak_rss_mb']:.0f}",
                      "/".join(f"{row['ttft_ms'][n]:.0f}" if n in row["ttft_ms"] else "-" for n in lengths),
                      f"{row['prefill_tokens_per_s']:.0f}",
                      f"{decode['median']:.1f} ({decode['min']:.1f}-{decode['max']:.1f})",
                      f"{detail['decode_model_tokens_per_s']['median']:.1f}", f"{rest:.0f}",
                      f"{detail['grammar_us']['median']:.0f}" if "grammar_us" in detail else "-",
                      f"x{row['decode_ratio_vs_first']:.2f}")
    settings = result["settings"]
    table.caption = (f"decode: median (min-max), end-to-end (model + greedy sampling + detokenizing; "
                     f"'model only' leaves those out, 'µs/tok rest' is them; 'µs/tok grammar': the JSON-schema mask "
                     f"of constrained decoding, per token); ratio: decode vs the first bundle. "
                     f"Medians of {settings['repeats']} interleaved runs after {settings['warmup']} warm-up; "
                     f"decode: {settings['decode_tokens']} tokens forced after a {settings['decode_prompt_tokens']}-token "
                     f"prompt; threads {settings['threads'] or 'onnxruntime default'}; {result['machine']['cores']} cores "
                     f"({result['machine']['cpu']}; {' '.join(result['machine']['isa'])})")
    return _keep_digits(table)


def encoder_bench_table(result: dict[str, Any]) -> Table:
    """Encoder bundles: sentences/s per (batch, tokens) case, p50/p99 latency, and the ratio to the first."""
    table = Table("bundle", "MB", "RSS MB", "batch x tokens", "sentences/s", "p50 / p99 ms", "ratio", title="edgelm bench")
    table.columns[0].no_wrap = True
    for row in result["bundles"]:
        for case in row["cases"]:
            latency = case["latency_ms"]
            table.add_row(row["name"], f"{row['size_mb']:.0f}", f"{row['peak_rss_mb']:.0f}", f"{case['batch']} x {case['tokens']}",
                          f"{case['sentences_per_s']:.0f} ({case['sentences_per_s_min']:.0f}-{case['sentences_per_s_max']:.0f})",
                          f"{latency['p50']:.1f} / {latency['p99']:.1f}", f"x{case['ratio_vs_first']:.2f}")
    settings, machine = result["settings"], result["machine"]
    table.caption = (f"sentences/s: batch / the median call, median (min-max) of {settings['repeats']} interleaved runs after "
                     f"{settings['warmup']} warm-up; inputs of exactly that many tokens; threads "
                     f"{settings['threads'] or 'onnxruntime default'}; {machine['cores']} cores ({machine['cpu']})")
    return _keep_digits(table)


def profiles_table(profiles: Sequence[Any]) -> Table:
    """edgelm profiles: one row per profile."""
    table = Table("profile", "provider", "precision", "required fusions")
    for p in profiles:
        table.add_row(p.name, p.provider.replace("ExecutionProvider", ""), precision(p), ", ".join(p.fusions.required) or "-")
    return _keep_digits(table)


def check_plot_path(path: Path) -> None:
    """Before a bench runs: the chart can be written (matplotlib is there, the name is *.png)."""
    import importlib.util

    from edgelm_runtime.errors import GenerationError

    if importlib.util.find_spec("matplotlib") is None:
        raise GenerationError("--plot needs matplotlib", hint="pip install 'edgelm[bench]'")
    if path.suffix.lower() != ".png":
        raise GenerationError(f"--plot {path}: the chart is written as PNG", hint="name the file *.png")


def bench_plot(result: dict[str, Any], path: Any) -> None:
    """Bundles side by side: decode tokens/s, TTFT of the 128-token prompt, size (matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["bundles"]
    names = [row["name"] for row in rows]
    ttft = next((n for n in ("128", *rows[0]["ttft_ms"]) if n in rows[0]["ttft_ms"]), None)
    panels = [("decode tokens/s (higher is better)", [r["decode_tokens_per_s"] for r in rows]),
              (f"time to first token, {ttft}-token prompt, ms", [r["ttft_ms"].get(ttft, 0.0) for r in rows]),
              ("bundle size, MB", [r["size_mb"] for r in rows])]
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    for axis, (title, values) in zip(axes, panels):
        bars = axis.bar(names, values, color=[f"C{i}" for i in range(len(rows))])
        axis.bar_label(bars, fmt="%.0f")
        axis.margins(y=0.15)
        axis.set_title(title, fontsize=10)
        axis.tick_params(axis="x", labelrotation=20, labelsize=8)
    figure.suptitle(f"edgelm bench ({result['settings']['threads'] or 'default'} threads, medians)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def precision(profile: Any) -> str:
    """A profile's numeric format in a few words (edgelm profiles), as its scheme words it; an
    unregistered config type is refused (edgelm.quant.scheme_for), never guessed."""
    from edgelm.quant import scheme_for

    return scheme_for(profile.quantization).label(profile)


def _pruning_result(pruning: dict[str, Any]) -> str:
    """What pruning cost in the end: the quantized bundle against the *unpruned* fp32 model."""
    line = (f"{pruning['params_before'] / 1e6:.1f}M -> {pruning['params_after'] / 1e6:.1f}M params, "
            f"{pruning.get('bundle_mb')} MB (zlib {pruning.get('compressed_mb')} MB)")
    if pruning.get("bundle_perplexity_ratio_vs_unpruned") is not None:
        line += f", bundle ppl x{pruning['bundle_perplexity_ratio_vs_unpruned']:.3f} vs the unpruned fp32 model"
    return line


def build_summary(report: Any) -> Table:
    """One row per stage this build used, in order (the others are in the manifest), as each result words itself."""
    table = Table("stage", "seconds", "result", title=f"edgelm build: {report.manifest.name} ({report.manifest.profile})")
    for name, result in report.results.items():
        if result.shown:
            table.add_row(name, f"{report.seconds.get(name, 0):.1f}", result.note())
    if report.manifest.pruning:
        table.add_row("pruned", "", _pruning_result(report.manifest.pruning))
    table.add_row("total", f"{sum(report.seconds.values()):.1f}", "")
    return _keep_digits(table)


def manifest_summary(manifest: Manifest) -> Table:
    table = Table("field", "value", title=f"bundle {manifest.name}", show_header=False)
    size = sum(entry.size for entry in manifest.files.values())
    stages = manifest.provenance.get("stages", {})
    table.add_row("profile", f"{manifest.profile} ({manifest.provider})")
    table.add_row("format version", str(manifest.format_version))
    table.add_row("source", str(manifest.provenance.get("source", {}).get("path", "?")))
    for adapter in manifest.adapters:
        table.add_row("adapter", f"{adapter['path']} x{adapter['weight']:g} ({adapter.get('variant', 'lora')}, "
                                 f"sha256 {adapter['sha256'][:12]}, merge diff {adapter['merge_max_abs_diff']:.1e})")
    split = stages.get("package", {}).get("size_split")
    table.add_row("size", f"{size / 1e6:.1f} MB in {len(manifest.files)} files" + (f"; {size_split_note(split)}" if split else ""))
    if manifest.kv is not None:
        table.add_row("context", f"{manifest.max_seq_len} tokens, {manifest.kv.num_layers} layers, "
                                 f"{manifest.kv.num_kv_heads} KV heads x {manifest.kv.head_dim}")
    else:
        encoder = manifest.encoder
        what = f"{encoder.pooling} pooling{', normalised' if encoder.normalize else ''}" if encoder.labels == () \
            else f"labels {', '.join(encoder.labels[:8])}{' ...' if len(encoder.labels) > 8 else ''}"
        table.add_row("task", f"{encoder.task}: {encoder.output} ({what}), inputs up to {encoder.max_length} tokens")
    if manifest.static is not None:
        static = manifest.static
        table.add_row("static shapes", f"prefill {static.prefill_len} tokens per run, decode 1, KV window "
                                       f"{static.kv_window} (the context limit)")
    for name in ("prune", "rotate", "export", "encoder_export", "static", "fuse", "quantize", "encoder_quantize", "device",
                 "quality", "encoder_quality"):
        result = from_record(name, stages[name]) if name in stages else None
        if result is not None and result.shown:
            table.add_row(name, result.note())
    if manifest.pruning:
        table.add_row("pruned", _pruning_result(manifest.pruning))
    return _keep_digits(table)


def encoder_eval_table(result: dict[str, Any]) -> Table:
    """`edgelm eval` of an encoder bundle: its metrics against the fp32 reference."""
    from edgelm.pipeline.encoder_results import EncoderQualityResult

    table = Table("metric", "value", title=f"edgelm eval: {result['bundle']} ({result['task']})", show_header=False)
    table.add_row("reference", result["reference"])
    fields = {f for f in EncoderQualityResult.__dataclass_fields__}
    table.add_row("result", EncoderQualityResult(**{k: v for k, v in result.items() if k in fields}).note())
    for key in ("mean_cosine", "min_cosine", "retrieval_agreement", "retrieval_accuracy", "reference_retrieval_accuracy",
                "label_agreement", "accuracy", "reference_accuracy", "entity_f1"):
        if result.get(key) is not None:
            table.add_row(key, f"{result[key]:.4f}")
    return table
