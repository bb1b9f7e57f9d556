"""The `edgelm` command: parse options, call edgelm.api / edgelm_runtime, render with rich.

No logic lives here. Heavy imports happen inside commands, so `edgelm --help`, `chat` and
`generate` never import torch. Every EdgelmError is rendered once, as `error:` + `hint:`, exit 2."""

from __future__ import annotations

import functools
import importlib.util
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.console import Console
from rich.table import Table

from edgelm_runtime.errors import EdgelmRuntimeError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compile small causal LMs into ONNX bundles for edge devices, and run them offline.")
console = Console()
err_console = Console(stderr=True)
_DEBUG = {"on": False}


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors.")) -> None:
    _DEBUG["on"] = debug


def reports_errors(command: Callable) -> Callable:
    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if threading.current_thread() is threading.main_thread():
            # the launcher's quiet startup handlers end here: from now on Ctrl-C unwinds (cleanup runs)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        try:
            return command(*args, **kwargs)
        except EdgelmRuntimeError as exc:
            if _DEBUG["on"]:
                raise
            err_console.print(f"[bold red]error:[/] {exc.message}", highlight=False, soft_wrap=True)
            if exc.hint:
                err_console.print(f"[bold]hint:[/] {exc.hint}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("interrupted")
            raise typer.Exit(130) from None
    return wrapper


def _overrides(calibration: Optional[str], samples: Optional[int], max_seq_len: Optional[int],
               templates: Optional[Path] = None, prune_mlp: Optional[float] = None) -> dict[str, Any]:
    from edgelm.config.templates import load_templates

    return {"calibration.source": calibration, "calibration.samples": samples, "max_seq_len": max_seq_len,
            "templates": load_templates(templates) if templates else None, "prune.mlp_fraction": prune_mlp}


_PROVIDER_HELP = "Execution provider instead of the manifest's (e.g. CPUExecutionProvider to try a GPU bundle here)."
_ADAPTER_HELP = "PEFT LoRA folder, optionally :WEIGHT (repeatable, merged in order; replaces the recipe's list)."
_FROM_BUNDLE_HELP = "Rebuild from the plan recorded in this bundle's manifest (flags still override)."
_PRUNE_HELP = "Remove this fraction of every MLP's channels (structured pruning; the recipe's prune: for more)."


@app.command()
@reports_errors
def build(
    output: Path = typer.Option(..., "-o", "--output", help="Bundle folder to write."),
    profile: Optional[str] = typer.Option(None, "--profile", "-p", help="Device profile name or .yaml path (default cpu-int8)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="HF folder, .gguf file or org/name in the local HF cache (default: SmolLM2-135M-Instruct)."),
    adapter: Optional[list[str]] = typer.Option(None, "--adapter", "-a", help=_ADAPTER_HELP),
    recipe: Optional[Path] = typer.Option(None, "--recipe", "-r", help="Recipe .yaml."),
    from_bundle: Optional[Path] = typer.Option(None, "--from-bundle", help=_FROM_BUNDLE_HELP),
    calibration: Optional[str] = typer.Option(None, "--calibration", help="Calibration .txt (a sample per line) or .jsonl."),
    samples: Optional[int] = typer.Option(None, "--calibration-samples", help="Number of calibration samples."),
    max_seq_len: Optional[int] = typer.Option(None, "--max-seq-len", help="Context length of the bundle."),
    name: Optional[str] = typer.Option(None, "--name", help="Bundle name (default: the output folder name)."),
    accuracy_budget: Optional[float] = typer.Option(None, "--accuracy-budget", help="Max perplexity ratio vs fp32; keeps the fewest MatMuls in fp32 that meet it."),
    templates: Optional[Path] = typer.Option(None, "--templates", help="Prompt templates .yaml (added to the defaults by name)."),
    prune_mlp: Optional[float] = typer.Option(None, "--prune-mlp", help=_PRUNE_HELP),
    force: bool = typer.Option(False, "--force", help="Replace an existing output bundle."),
) -> None:
    """Build a bundle: load -> merge adapters -> prune -> export -> fuse -> quantize -> package -> quality check."""
    from edgelm import api
    from edgelm._render import BuildProgress, build_summary, quiet_libraries

    quiet_libraries()
    plan = api.plan_build(profile, recipe, model, name or (None if from_bundle else output.name),
                          _overrides(calibration, samples, max_seq_len, templates, prune_mlp), accuracy_budget, adapter,
                          from_bundle)
    for warning in api.host_warnings(plan):
        err_console.print(f"[bold yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    # SIGTERM unwinds like Ctrl-C, so the temporary build folder is removed and nothing is published.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with BuildProgress(console, api.PIPELINE) as progress:
        report = api.build(plan, output, force=force, progress=progress.update)
    console.print(build_summary(report))
    console.print(f"bundle written to [bold]{report.output}[/]")


@app.command()
@reports_errors
def plan(
    profile: Optional[str] = typer.Option(None, "--profile", "-p"),
    model: Optional[str] = typer.Option(None, "--model", "-m"),
    adapter: Optional[list[str]] = typer.Option(None, "--adapter", "-a", help=_ADAPTER_HELP),
    recipe: Optional[Path] = typer.Option(None, "--recipe", "-r"),
    from_bundle: Optional[Path] = typer.Option(None, "--from-bundle", help=_FROM_BUNDLE_HELP),
    calibration: Optional[str] = typer.Option(None, "--calibration"),
    samples: Optional[int] = typer.Option(None, "--calibration-samples"),
    max_seq_len: Optional[int] = typer.Option(None, "--max-seq-len"),
    accuracy_budget: Optional[float] = typer.Option(None, "--accuracy-budget"),
    templates: Optional[Path] = typer.Option(None, "--templates"),
    prune_mlp: Optional[float] = typer.Option(None, "--prune-mlp", help=_PRUNE_HELP),
) -> None:
    """Print the fully resolved build plan (every default explicit) without building."""
    from edgelm import api

    resolved = api.plan_build(profile, recipe, model, None,
                              _overrides(calibration, samples, max_seq_len, templates, prune_mlp),
                              accuracy_budget, adapter, from_bundle)
    console.print_json(json.dumps(resolved.summary()))


profiles_app = typer.Typer(help="List the device profiles, or show one in full.", no_args_is_help=False)
app.add_typer(profiles_app, name="profiles")


@profiles_app.callback(invoke_without_command=True)
@reports_errors
def profiles(ctx: typer.Context) -> None:
    """List the built-in device profiles: provider, precision, required fusions."""
    if ctx.invoked_subcommand is not None:
        return
    from edgelm._render import precision
    from edgelm.config.profile import list_profiles

    table = Table("profile", "provider", "precision", "required fusions")
    for p in list_profiles():
        table.add_row(p.name, p.provider.replace("ExecutionProvider", ""), precision(p),
                      ", ".join(p.fusions.required) or "-")
    console.print(table)
    console.print("[dim]edgelm profiles show NAME prints one in full; --profile also takes a path to your own .yaml[/]")


@profiles_app.command("show")
@reports_errors
def profiles_show(name: str = typer.Argument(..., help="Profile name or path to a .yaml profile.")) -> None:
    """Print one profile with every field (defaults included), as YAML you can copy and edit."""
    import yaml

    from edgelm.config.profile import load_profile

    profile = load_profile(name)
    sys.stdout.write(yaml.safe_dump(profile.model_dump(mode="json"), sort_keys=False))


@app.command()
@reports_errors
def inspect(bundle: Path = typer.Argument(..., help="Bundle folder."),
            as_json: bool = typer.Option(False, "--json", help="Print the whole manifest as JSON.")) -> None:
    """Summarise a bundle's manifest: profile, sizes, parity, fusions, quality."""
    from edgelm._render import manifest_summary
    from edgelm_runtime.bundle import read_manifest, verify_bundle

    manifest = verify_bundle(bundle, read_manifest(bundle), check_hashes=False)
    if as_json:
        console.print_json(json.dumps(manifest.to_dict()))
    else:
        console.print(manifest_summary(manifest))


@app.command()
@reports_errors
def verify(bundle: Path = typer.Argument(..., help="Bundle folder.")) -> None:
    """Check a bundle: format version, every path inside the folder, every file's size and sha256."""
    import edgelm_runtime as er

    manifest = er.verify_bundle(bundle, check_hashes=True)
    size = sum(entry.size for entry in manifest.files.values())
    console.print(f"{bundle}: ok — format {manifest.format_version}, {len(manifest.files)} files, "
                  f"{size / 1e6:.1f} MB, every size and sha256 as in manifest.json")


@app.command("eval")
@reports_errors
def evaluate(
    bundle: Path = typer.Argument(..., help="Bundle folder."),
    reference: Optional[str] = typer.Option(None, "--reference", help="Bundle folder or model (default: the bundle's source model, fp32)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for machines."),
    windows: int = typer.Option(8, "--windows", help="Perplexity windows."),
    window_len: int = typer.Option(256, "--window-len", help="Tokens per window."),
    eval_text: str = typer.Option("builtin", "--eval-text", help="Held-out .txt (default: BBC tech articles)."),
    tasks: str = typer.Option("sentiment,topic", "--tasks", help="Comma-separated tasks, or '' for none."),
    samples: int = typer.Option(100, "--samples", help="Examples per task (balanced over labels)."),
    shots: str = typer.Option("0,3", "--shots", help="Comma-separated few-shot counts."),
    seed: int = typer.Option(0, "--seed", help="Seed of the task splits."),
    max_perplexity_ratio: Optional[float] = typer.Option(None, "--max-perplexity-ratio", help="Gate: fail (exit 2) above this ratio."),
    min_top1_agreement: Optional[float] = typer.Option(None, "--min-top1-agreement", help="Gate: fail below this agreement."),
    max_kl_divergence: Optional[float] = typer.Option(None, "--max-kl-divergence", help="Gate: fail above this KL."),
    provider: Optional[str] = typer.Option(None, "--provider", help=_PROVIDER_HELP),
    max_accuracy_drop: Optional[float] = typer.Option(None, "--max-accuracy-drop", help="Gate: fail when a task loses more accuracy than this (0.01 = 1 point)."),
) -> None:
    """Measure a bundle against a reference: perplexity, top-1 agreement, KL, zero/few-shot accuracy.

    With gates, the numbers are printed and a missed gate exits 2 (for CI)."""
    from edgelm._render import StepProgress, eval_table, quiet_libraries
    from edgelm.config._yaml import validate
    from edgelm.config.profile import QualityGates
    from edgelm.eval.evaluate import check_gates
    from edgelm.eval.evaluate import evaluate as run_eval

    quiet_libraries()
    task_names = [t.strip() for t in tasks.split(",") if t.strip()]
    shot_counts = [int(k) for k in shots.split(",") if k.strip()]
    with StepProgress(err_console if as_json else console) as progress:
        result = run_eval(bundle, reference, windows, window_len, eval_text, task_names, samples, shot_counts, seed,
                          progress=progress.update, provider=provider)
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    else:
        console.print(eval_table(result))
    gates = validate({"max_perplexity_ratio": max_perplexity_ratio, "min_top1_agreement": min_top1_agreement,
                      "max_kl_divergence": max_kl_divergence}, QualityGates, "eval options", "eval")
    check_gates(result, gates, max_accuracy_drop)


@app.command()
@reports_errors
def bench(
    bundles: list[Path] = typer.Argument(..., help="Bundle folders; ratios are against the first."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Intra-op threads (default: the manifest's)."),
    repeats: int = typer.Option(5, "--repeats", help="Timed repetitions per bundle (medians reported)."),
    warmup: int = typer.Option(1, "--warmup", help="Untimed repetitions first."),
    decode_tokens: int = typer.Option(128, "--decode-tokens", help="Tokens generated per decode run (forced)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for machines (stable schema)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG chart of the bundles side by side."),
    provider: Optional[str] = typer.Option(None, "--provider", help=_PROVIDER_HELP),
) -> None:
    """Measure bundles here: load time, TTFT (32/128/512-token prompts), prefill and decode speed, RSS.

    Each bundle runs in its own process; repetitions are interleaved across bundles."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from edgelm._render import bench_plot, bench_table
    from edgelm_runtime.bench import bench as run_bench
    from edgelm_runtime.errors import GenerationError

    if plot is not None:
        if importlib.util.find_spec("matplotlib") is None:
            raise GenerationError("--plot needs matplotlib", hint="pip install 'edgelm[bench]'")
        if plot.suffix.lower() != ".png":
            raise GenerationError(f"--plot {plot}: the chart is written as PNG", hint="name the file *.png")
    with Progress(TextColumn("{task.description:<40}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err_console if as_json else console, transient=as_json) as bar:
        task = bar.add_task("loading bundles", total=None)
        result = run_bench(bundles, threads, repeats, warmup, decode_tokens,
                           progress=lambda what, done, total: bar.update(task, description=what, completed=done, total=total),
                           provider=provider)
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    else:
        console.print(bench_table(result))
    if plot is not None:
        bench_plot(result, plot)
        (err_console if as_json else console).print(f"chart written to {plot}")


def _sampling(temperature: Optional[float], top_k: Optional[int], top_p: Optional[float], seed: Optional[int],
              max_new_tokens: Optional[int], repetition_penalty: Optional[float]) -> dict[str, Any]:
    return {"temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": seed,
            "max_new_tokens": max_new_tokens, "repetition_penalty": repetition_penalty}


@app.command()
@reports_errors
def generate(
    bundle: Path = typer.Argument(..., help="Bundle folder."),
    prompt: str = typer.Argument(..., help="Text to continue."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", "-n"),
    temperature: Optional[float] = typer.Option(None, "--temperature", "-t", help="0 = greedy."),
    top_k: Optional[int] = typer.Option(None, "--top-k"),
    top_p: Optional[float] = typer.Option(None, "--top-p"),
    repetition_penalty: Optional[float] = typer.Option(None, "--repetition-penalty"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    threads: Optional[int] = typer.Option(None, "--threads"),
    provider: Optional[str] = typer.Option(None, "--provider", help=_PROVIDER_HELP),
) -> None:
    """Continue a prompt with the bundle, streaming the text."""
    import edgelm_runtime as er

    llm = er.load_bundle(bundle, threads=threads, provider=provider)
    for piece in llm.generate_stream(prompt, **_sampling(temperature, top_k, top_p, seed, max_new_tokens, repetition_penalty)):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


@app.command()
@reports_errors
def chat(
    bundle: Path = typer.Argument(..., help="Bundle folder."),
    system: Optional[str] = typer.Option(None, "--system", help="System prompt."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", "-n"),
    temperature: Optional[float] = typer.Option(None, "--temperature", "-t"),
    top_k: Optional[int] = typer.Option(None, "--top-k"),
    top_p: Optional[float] = typer.Option(None, "--top-p"),
    repetition_penalty: Optional[float] = typer.Option(None, "--repetition-penalty"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    threads: Optional[int] = typer.Option(None, "--threads"),
    provider: Optional[str] = typer.Option(None, "--provider", help=_PROVIDER_HELP),
) -> None:
    """Chat with a bundle offline: streaming, multi-turn. /reset, /system TEXT, /exit (or Ctrl-D)."""
    import edgelm_runtime as er

    llm = er.load_bundle(bundle, threads=threads, provider=provider)
    options = _sampling(temperature, top_k, top_p, seed, max_new_tokens, repetition_penalty)
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    llm.render_chat([*history, {"role": "user", "content": "Hello"}])  # a broken chat template fails here, not mid-chat
    console.print(f"[dim]{llm.manifest.name} ({llm.manifest.profile}) — /reset clears the history, "
                  "/system TEXT sets the system prompt, /exit or Ctrl-D quits, Ctrl-C stops an answer[/]")
    while True:
        try:
            user = console.input("[bold green]you>[/] ")
        except EOFError:  # Ctrl-D
            console.print()
            return
        except KeyboardInterrupt:  # Ctrl-C at the prompt clears the line, as in a shell
            console.print("\n[dim](Ctrl-D or /exit to quit)[/]")
            continue
        command = user.strip()
        if command in ("/exit", "/quit"):
            return
        if command == "/reset":
            history = [m for m in history if m["role"] == "system"]
            console.print("[dim]history cleared[/]")
            continue
        if command.startswith("/system"):
            text = command[len("/system"):].strip()
            history = [m for m in history if m["role"] != "system"]
            if text:
                history.insert(0, {"role": "system", "content": text})
            console.print(f"[dim]system prompt {'set' if text else 'removed'}[/]")
            continue
        if not command:
            continue
        history.append({"role": "user", "content": user})
        try:
            history = _chat_turn(llm, history, options)
        except KeyboardInterrupt:  # Ctrl-C anywhere in a turn: back to the prompt, the chat goes on
            console.print(" [dim](stopped)[/]")


@app.command()
@reports_errors
def serve(
    bundle: Path = typer.Argument(..., help="Bundle folder."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (default: this machine only)."),
    port: int = typer.Option(8000, "--port"),
    queue: int = typer.Option(8, "--queue", help="Requests that may wait while one generates; more get 429."),
    threads: Optional[int] = typer.Option(None, "--threads"),
    provider: Optional[str] = typer.Option(None, "--provider", help=_PROVIDER_HELP),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="EDGELM_API_KEY",
                                          help="Require 'Authorization: Bearer KEY' on /v1 (or set EDGELM_API_KEY)."),
) -> None:
    """Serve a bundle with an OpenAI-compatible API: /v1/chat/completions, /v1/completions, /v1/models, /health."""
    import edgelm_runtime as er

    try:
        from edgelm_runtime.server import serve as run_server
    except ImportError:
        raise er.GenerationError("edgelm serve needs starlette and uvicorn",
                                 hint="pip install 'edgelm-runtime[server]'") from None
    if queue < 0:
        raise er.GenerationError(f"--queue {queue}: must be 0 or more", hint="e.g. --queue 8")
    llm = er.load_bundle(bundle, threads=threads, provider=provider)
    console.print(f"serving {llm.manifest.name} on http://{host}:{port}/v1 (Ctrl-C stops)")
    run_server(llm, host, port, queue, api_key or None)


def _chat_turn(llm: Any, history: list[dict[str, str]], options: dict[str, Any]) -> list[dict[str, str]]:
    """One answer, streamed; returns the history with it (trimmed to fit the context)."""
    import edgelm_runtime as er

    try:
        kept = llm.fit_history(history, options["max_new_tokens"])
    except er.TemplateError:  # the bundle's chat template is broken: no turn can work, end the chat (exit 2)
        raise
    except er.GenerationError as exc:
        err_console.print(f"[bold red]error:[/] {exc.message}\n[bold]hint:[/] {exc.hint}", highlight=False)
        return history[:-1]
    if len(kept) < len(history):
        console.print(f"[dim](the {len(history) - len(kept)} oldest messages no longer fit the context: dropped)[/]")
    console.print("[bold cyan]bot>[/] ", end="")
    pieces = []
    try:
        for piece in llm.chat_stream(kept, **options):
            pieces.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt:
        console.print(" [dim](stopped)[/]", end="")
    sys.stdout.write("\n")
    stats = llm.last_stats
    if stats is not None:
        console.print(f"[dim]{stats.generated_tokens} tokens, {stats.decode_tokens_per_s:.1f} tok/s, "
                      f"first token {stats.time_to_first_token_s * 1000:.0f} ms[/]")
    return [*kept, {"role": "assistant", "content": "".join(pieces)}]


def main() -> None:
    app()


if __name__ == "__main__":
    main()
