"""The `edgelm` command: parse options, call edgelm.api / edgelm_runtime, render with rich.

No logic lives here. Heavy imports happen inside commands, so `edgelm --help`, `chat` and
`generate` never import torch. Every EdgelmError is rendered once, as `error:` + `hint:`, exit 2."""

from __future__ import annotations

import functools
import json
import signal
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from edgelm import _cli_base as o
from edgelm._cli_base import DEBUG, console, err_console, reports_errors, run
from edgelm._matrix_cli import matrix

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, cls=o.Group,
                  context_settings=o.SETTINGS,
                  help="Compile small causal LMs into ONNX bundles for edge devices, and run them offline.")
command = functools.partial(app.command, cls=o.Command)
ADAPTER_MODE = typer.Option(None, "--adapter-mode", help="merge (default): adapters baked into the weights; runtime: "
                            "kept apart, switched per request (one base bundle).")


def _version(shown: bool) -> None:
    if shown:
        from importlib.metadata import version

        import edgelm

        console.print(f"edgelm {edgelm.__version__}, edgelm-runtime {version('edgelm-runtime')}", highlight=False)
        raise typer.Exit()


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
          version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the edgelm and edgelm-runtime versions and exit.")) -> None:
    DEBUG["on"] = debug


def _plan(profile: Optional[str], recipe: Optional[Path], model: Optional[str], name: Optional[str],
          from_bundle: Optional[Path], adapter: Optional[list[str]], budget: Optional[float],
          adapter_mode: Optional[str] = None, **overrides: Any) -> Any:
    from edgelm import api

    return api.plan_build(profile=profile, recipe=recipe, model=model, name=name, from_bundle=from_bundle,
                          adapters=adapter, accuracy_budget=budget, overrides=api.BuildOverrides(**overrides),
                          adapter_mode=adapter_mode)


@command()
@reports_errors
def build(
    output: Path = typer.Option(..., "-o", "--output", help="Bundle folder to write."),
    profile: Optional[str] = o.PROFILE, model: Optional[str] = o.MODEL, adapter: Optional[list[str]] = o.ADAPTER,
    recipe: Optional[Path] = o.RECIPE, from_bundle: Optional[Path] = o.FROM_BUNDLE,
    calibration: Optional[str] = o.CALIBRATION, samples: Optional[int] = o.SAMPLES, max_seq_len: Optional[int] = o.MAX_SEQ_LEN,
    name: Optional[str] = typer.Option(None, "--name", help="Bundle name (default: the output folder name)."),
    accuracy_budget: Optional[float] = o.BUDGET, templates: Optional[Path] = o.TEMPLATES, prune_mlp: Optional[float] = o.PRUNE,
    task: Optional[str] = o.TASK, force: bool = typer.Option(False, "--force", help="Replace an existing output bundle."),
    adapter_mode: Optional[str] = ADAPTER_MODE,
    add_adapter: Optional[str] = typer.Option(None, "--add-adapter", help="With --from-bundle: copy a runtime-adapter "
                                              "bundle with one more adapter PATH[:WEIGHT][@NAME], base unchanged."),
) -> None:
    """Build a bundle: load -> merge adapters -> prune -> export -> fuse -> quantize -> package -> quality check."""
    from edgelm import api
    from edgelm._render import BuildProgress, StepProgress, build_summary, quiet_libraries

    quiet_libraries()
    if add_adapter is not None:
        from edgelm.errors import ConfigError

        if from_bundle is None:
            raise ConfigError("--add-adapter needs --from-bundle (the bundle to add it to)",
                              hint="edgelm build --from-bundle dist/x --add-adapter path/to/adapter -o dist/y")
        with StepProgress(console) as progress:
            added = api.add_adapter(from_bundle, add_adapter, output, force=force, progress=progress.update)
        entry = added.runtime_adapters[-1]
        console.print(f"adapter [bold]{entry.name}[/] added (ppl x{entry.quality['perplexity_ratio']:.3f}, top-1 "
                      f"{entry.quality['top1_agreement']:.3f} vs merged fp32); bundle written to [bold]{output}[/]")
        return
    plan = _plan(profile, recipe, model, name or (None if from_bundle else output.name), from_bundle, adapter,
                 accuracy_budget, adapter_mode, calibration_source=calibration, samples=samples, max_seq_len=max_seq_len,
                 templates=templates, prune_mlp=prune_mlp, task=task)
    for warning in api.host_warnings(plan):
        err_console.print(f"[bold yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    # SIGTERM unwinds like Ctrl-C, so the temporary build folder is removed and nothing is published.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with BuildProgress(console, api.pipeline_for(plan)) as progress:
        report = api.build(plan, output, force=force, progress=progress.update)
    console.print(build_summary(report))
    console.print(f"bundle written to [bold]{report.output}[/]")


@command()
@reports_errors
def plan(
    profile: Optional[str] = o.PROFILE, model: Optional[str] = o.MODEL, adapter: Optional[list[str]] = o.ADAPTER,
    recipe: Optional[Path] = o.RECIPE, from_bundle: Optional[Path] = o.FROM_BUNDLE,
    calibration: Optional[str] = o.CALIBRATION, samples: Optional[int] = o.SAMPLES, max_seq_len: Optional[int] = o.MAX_SEQ_LEN,
    accuracy_budget: Optional[float] = o.BUDGET, templates: Optional[Path] = o.TEMPLATES, prune_mlp: Optional[float] = o.PRUNE,
    task: Optional[str] = o.TASK, adapter_mode: Optional[str] = ADAPTER_MODE,
) -> None:
    """Print the fully resolved build plan (every default explicit) without building."""
    resolved = _plan(profile, recipe, model, None, from_bundle, adapter, accuracy_budget, adapter_mode, calibration_source=calibration,
                     samples=samples, max_seq_len=max_seq_len, templates=templates, prune_mlp=prune_mlp, task=task)
    console.print_json(json.dumps(resolved.summary()))


profiles_app = typer.Typer(help="List the device profiles, or show one in full.", no_args_is_help=False, cls=o.Group,
                           context_settings=o.SETTINGS)
app.add_typer(profiles_app, name="profiles")


@profiles_app.callback(invoke_without_command=True)
@reports_errors
def profiles(ctx: typer.Context) -> None:
    """List the built-in device profiles: provider, precision, required fusions."""
    if ctx.invoked_subcommand is not None:
        return
    from edgelm._render import profiles_table
    from edgelm.config.profile import list_profiles

    console.print(profiles_table(list_profiles()))
    console.print("[dim]edgelm profiles show NAME prints one in full; --profile also takes a path to your own .yaml[/]")


@profiles_app.command("show", cls=o.Command)
@reports_errors
def profiles_show(name: str = typer.Argument(..., help="Profile name or path to a .yaml profile.")) -> None:
    """Print one profile with every field (defaults included), as YAML you can copy and edit."""
    import yaml

    from edgelm.config.profile import load_profile

    sys.stdout.write(yaml.safe_dump(load_profile(name).model_dump(mode="json"), sort_keys=False))


@command()
@reports_errors
def inspect(bundle: Path = o.BUNDLE,
            as_json: bool = typer.Option(False, "--json", help="Print the whole manifest as JSON.")) -> None:
    """Summarise a bundle's manifest: profile, sizes, parity, fusions, quality."""
    from edgelm._render import manifest_summary
    from edgelm_runtime.bundle import read_manifest, verify_bundle

    manifest = verify_bundle(bundle, read_manifest(bundle), check_hashes=False)
    if as_json:
        console.print_json(json.dumps(manifest.to_dict()))
    else:
        console.print(manifest_summary(manifest))


@command()
@reports_errors
def verify(bundle: Path = o.BUNDLE) -> None:
    """Check a bundle: format version, every path inside the folder, every file's size and sha256."""
    import edgelm_runtime as er

    manifest = er.verify_bundle(bundle, check_hashes=True)
    size = sum(entry.size for entry in manifest.files.values())
    console.print(f"{bundle}: ok — format {manifest.format_version}, {len(manifest.files)} files, "
                  f"{size / 1e6:.1f} MB, every size and sha256 as in manifest.json")


@command()
@reports_errors
def clean(folder: Path = typer.Argument(Path("."), help="The folder builds wrote into (beside their -o).")) -> None:
    """Remove the temporary build folders (.edgelm-build-*) that killed builds left behind."""
    from edgelm.pipeline.workspace import clean_stale, live_workspaces

    removed, kept = clean_stale(folder), live_workspaces(folder)
    console.print("".join(f"removed {path}\n" for path in removed) + f"{folder}: {len(removed)} stale build "
                  f"folder(s) removed" + (f", {len(kept)} in use by a running build kept" if kept else ""))


@command("eval")
@reports_errors
def evaluate(
    bundle: Path = o.BUNDLE,
    reference: Optional[str] = typer.Option(None, "--reference", help="Bundle folder or model (default: the bundle's source model, fp32)."),
    as_json: bool = o.JSON,
    windows: int = typer.Option(8, "--windows", help="Perplexity windows."),
    window_len: int = typer.Option(256, "--window-len", help="Tokens per window."),
    eval_text: str = typer.Option("builtin", "--eval-text", help="Held-out .txt (default: BBC tech articles)."),
    tasks: str = typer.Option("sentiment,topic", "--tasks", help="Comma-separated tasks (sentiment, topic, capitals, yesno), or '' for none."),
    formats: str = typer.Option("plain", "--formats", help="Comma-separated prompt formats: plain, classify, chat."),
    selection: str = typer.Option("round-robin", "--selection", help="Few-shot examples: round-robin, or nearest (by --embedder)."),
    embedder: Optional[Path] = typer.Option(None, "--embedder", help="Feature-extraction bundle for --selection nearest."),
    samples: int = typer.Option(100, "--samples", help="Examples per task (balanced over labels)."),
    shots: str = typer.Option("0,3", "--shots", help="Comma-separated few-shot counts."),
    seed: int = typer.Option(0, "--seed", help="Seed of the task splits."),
    max_perplexity_ratio: Optional[float] = typer.Option(None, "--max-perplexity-ratio", help="Gate: fail (exit 2) above this ratio."),
    min_top1_agreement: Optional[float] = typer.Option(None, "--min-top1-agreement", help="Gate: fail below this agreement."),
    max_kl_divergence: Optional[float] = typer.Option(None, "--max-kl-divergence", help="Gate: fail above this KL."),
    provider: Optional[str] = o.PROVIDER,
    max_accuracy_drop: Optional[float] = typer.Option(None, "--max-accuracy-drop", help="Gate: fail when a task loses more accuracy than this (0.01 = 1 point)."),
    chat_prompts: int = typer.Option(32, "--chat-prompts", help="Held-out chat prompts answered greedily by both (0: none)."),
    chat_tokens: int = typer.Option(32, "--chat-tokens", help="Tokens per chat answer."),
    min_chat_identical: Optional[float] = typer.Option(None, "--min-chat-identical", help="Gate: fail below this share of identical chat answers."),
    max_chat_kl: Optional[float] = typer.Option(None, "--max-chat-kl", help="Gate: fail above this KL on the chat answers."),
) -> None:
    """Measure a bundle against a reference: perplexity, top-1 agreement, KL, zero/few-shot accuracy.

    With gates, the numbers are printed and a missed gate exits 2 (for CI)."""
    from edgelm import api
    from edgelm._render import StepProgress, encoder_eval_table, eval_table, quiet_libraries

    quiet_libraries()
    with StepProgress(err_console if as_json else console) as progress:
        report = api.evaluate(bundle, reference=reference, windows=windows, window_len=window_len, eval_text=eval_text,
                              tasks=[t.strip() for t in tasks.split(",") if t.strip()], samples=samples,
                              shots=[int(k) for k in shots.split(",") if k.strip()], seed=seed, provider=provider,
                              max_perplexity_ratio=max_perplexity_ratio, min_top1_agreement=min_top1_agreement,
                              max_kl_divergence=max_kl_divergence, max_accuracy_drop=max_accuracy_drop, check=False,
                              progress=progress.update, formats=[f.strip() for f in formats.split(",") if f.strip()],
                              selection=selection, embedder=embedder, chat_prompts=chat_prompts, chat_tokens=chat_tokens,
                              min_chat_identical=min_chat_identical, max_chat_kl=max_chat_kl)
    if as_json:
        sys.stdout.write(json.dumps(report.result, indent=2) + "\n")
    else:
        console.print(eval_table(report.result) if "task" not in report.result else encoder_eval_table(report.result))
    report.check()


@command()
@reports_errors
def bench(
    bundles: list[Path] = typer.Argument(..., help="Bundle folders; ratios are against the first."),
    threads: Optional[int] = o.THREADS,
    repeats: int = typer.Option(5, "--repeats", help="Timed repetitions per bundle (medians reported)."),
    warmup: int = typer.Option(1, "--warmup", help="Untimed repetitions first."),
    decode_tokens: int = typer.Option(128, "--decode-tokens", help="Tokens generated per decode run (forced)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for machines (stable schema)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG chart of the bundles side by side."),
    provider: Optional[str] = o.PROVIDER,
) -> None:
    """Measure bundles here: load time, TTFT (32/128/512-token prompts), prefill and decode speed, RSS.

    Each bundle runs in its own process; repetitions are interleaved across bundles."""
    from edgelm._render import BenchProgress, bench_plot, bench_table, check_plot_path, encoder_bench_table
    from edgelm_runtime.bench import bench as run_bench
    from edgelm_runtime.bundle import read_manifest
    from edgelm_runtime.encoder_bench import bench_encoder_bundles

    if plot is not None:
        check_plot_path(plot)
    encoders = read_manifest(bundles[0]).encoder is not None  # sentences/s at batch 1 and 32 instead of tokens/s
    with BenchProgress(err_console if as_json else console, transient=as_json) as progress:
        result = bench_encoder_bundles(bundles, threads, repeats, warmup, progress=progress.update) if encoders else \
            run_bench(bundles, threads, repeats, warmup, decode_tokens, progress=progress.update, provider=provider)
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    else:
        console.print(encoder_bench_table(result) if encoders else bench_table(result))
    if plot is not None:
        bench_plot(result, plot)
        (err_console if as_json else console).print(f"chart written to {plot}")


command("matrix")(matrix)  # edgelm/_matrix_cli.py: the Ray driver's live table and report


def _sampling(temperature: Optional[float], top_k: Optional[int], top_p: Optional[float], seed: Optional[int],
              max_new_tokens: Optional[int], repetition_penalty: Optional[float]) -> dict[str, Any]:
    return dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, max_new_tokens=max_new_tokens,
                repetition_penalty=repetition_penalty)


@command()
@reports_errors
def generate(
    bundle: Path = o.BUNDLE, prompt: str = typer.Argument(..., help="Text to continue."),
    max_new_tokens: Optional[int] = o.MAX_NEW, temperature: Optional[float] = o.TEMPERATURE, top_k: Optional[int] = o.TOP_K,
    top_p: Optional[float] = o.TOP_P, repetition_penalty: Optional[float] = o.PENALTY, seed: Optional[int] = o.SEED,
    threads: Optional[int] = o.THREADS, provider: Optional[str] = o.PROVIDER,
) -> None:
    """Continue a prompt with the bundle, streaming the text."""
    import edgelm_runtime as er

    llm = er.load_bundle(bundle, threads=threads, provider=provider)
    for piece in llm.generate_stream(prompt, **_sampling(temperature, top_k, top_p, seed, max_new_tokens, repetition_penalty)):
        print(piece, end="", flush=True)
    print()


@command()
@reports_errors
def chat(
    bundle: Path = o.BUNDLE, system: Optional[str] = typer.Option(None, "--system", help="System prompt."),
    max_new_tokens: Optional[int] = o.MAX_NEW, temperature: Optional[float] = o.TEMPERATURE, top_k: Optional[int] = o.TOP_K,
    top_p: Optional[float] = o.TOP_P, repetition_penalty: Optional[float] = o.PENALTY, seed: Optional[int] = o.SEED,
    threads: Optional[int] = o.THREADS, provider: Optional[str] = o.PROVIDER,
) -> None:
    """Chat with a bundle offline: streaming, multi-turn. /reset, /system TEXT, /exit (or Ctrl-D)."""
    import edgelm_runtime as er
    from edgelm._chat import chat_session

    llm = er.load_bundle(bundle, threads=threads, provider=provider)
    options = _sampling(temperature, top_k, top_p, seed, max_new_tokens, repetition_penalty)
    chat_session(llm, console, err_console, system, options)


@command()
@reports_errors
def serve(
    bundle: Path = o.BUNDLE,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (default: this machine only)."),
    port: int = typer.Option(8000, "--port"),
    queue: int = typer.Option(8, "--queue", help="Requests that may wait while one generates; more get 429."),
    threads: Optional[int] = o.THREADS, provider: Optional[str] = o.PROVIDER,
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="EDGELM_API_KEY",
                                          help="Require 'Authorization: Bearer KEY' on /v1 (or set EDGELM_API_KEY)."),
    embeddings: Optional[Path] = typer.Option(None, "--embeddings", help="Also serve /v1/embeddings from this bundle."),
    parallel: int = typer.Option(1, "--parallel", help="Generations at once, their decode steps batched (slots)."),
    kv_cache_mb: float = typer.Option(256, "--kv-cache-mb", help="KV caches kept for prompts that start alike (0: off)."),
) -> None:
    """Serve a bundle with an OpenAI-compatible API: /v1/chat/completions and /v1/completions (a decoder
    bundle) or its task's /v1/embeddings, /v1/classify or /v1/tag (an encoder bundle); /v1/models, /health."""
    from edgelm._serve import start_server

    start_server(bundle, host, port, queue, threads, provider, api_key, console, embeddings, parallel, kv_cache_mb)


def main() -> None:
    run(app)


if __name__ == "__main__":
    main()
