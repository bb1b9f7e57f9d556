"""`edgelm chat`'s interactive loop: read a line, run a slash command or stream an answer.

Torch-free (edgelm_runtime only), like the command itself."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console

HELP = "/reset clears the history, /system TEXT sets the system prompt, /exit or Ctrl-D quits, Ctrl-C stops an answer"


def chat_session(llm: Any, console: Console, err_console: Console, system: str | None, options: dict[str, Any]) -> None:
    """Multi-turn chat on the console until /exit, /quit or Ctrl-D."""
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    llm.render_chat([*history, {"role": "user", "content": "Hello"}])  # a broken chat template fails here, not mid-chat
    console.print(f"[dim]{llm.manifest.name} ({llm.manifest.profile}) — {HELP}[/]")
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
            history = chat_turn(llm, history, options, console, err_console)
        except KeyboardInterrupt:  # Ctrl-C anywhere in a turn: back to the prompt, the chat goes on
            console.print(" [dim](stopped)[/]")


def chat_turn(llm: Any, history: list[dict[str, str]], options: dict[str, Any], console: Console,
              err_console: Console) -> list[dict[str, str]]:
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
