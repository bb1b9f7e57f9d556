"""`edgelm serve` under concurrent clients: throughput and per-request latency at 1/2/4/8 streams
(`benchmarks/server_load.py BUNDLE --concurrency 1 2 4 8` runs it).

Starts `edgelm serve BUNDLE --parallel P` on a free local port, then for each concurrency C sends
`--rounds` rounds of C streaming chat requests at once (greedy, `--tokens` new tokens each, the
held-out chat prompts). Per level: aggregate completion tokens/s (all tokens of a round over its
wall time, medians over rounds), its ratio to one stream measured in the same run, and the p50/p95
of the time to first token and of the whole request. Every stream's text is checked against the
same prompt sent alone (C = 1): batching must not change a greedy answer. Prefix reuse is off
(--kv-cache-mb 0), so a repeated prompt prefills as it did alone and batching is measured alone.

    python benchmarks/server_load.py dist/smollm2-int8 --parallel 8 --concurrency 1 2 4 8 --tokens 96 --rounds 3
"""

from __future__ import annotations

import json
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

from edgelm.eval.chat_data import held_out_chat_prompts
from edgelm_runtime.hardware import cpu_model


MODEL = [""]  # the served model's id, from /v1/models


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(bundle: str, parallel: int, threads: int | None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "edgelm.cli", "serve", bundle, "--port", str(port), "--parallel", str(parallel),
               "--queue", "64", "--kv-cache-mb", "0"] + (["--threads", str(threads)] if threads else [])
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=1) as response:
                MODEL[0] = json.load(response)["data"][0]["id"]
                return process, url
        except OSError:
            if process.poll() is not None:
                raise SystemExit(process.stderr.read())
            time.sleep(0.3)
    process.kill()
    raise SystemExit("the server did not start in 120 s")


def request(url: str, prompt: str, tokens: int) -> dict:
    """One streaming chat completion: its text, token count (from usage), TTFT and total seconds."""
    body = json.dumps({"model": MODEL[0], "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens,
                       "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}).encode()
    sent = time.perf_counter()
    first, text, usage = None, "", {}
    post = urllib.request.Request(url + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(post, timeout=600) as response:
        for line in response:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            usage = event.get("usage") or usage
            for choice in event.get("choices", []):
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    first = first or time.perf_counter()
                    text += piece
    done = time.perf_counter()
    return {"text": text, "tokens": usage.get("completion_tokens", 0), "ttft": (first or done) - sent,
            "seconds": done - sent}


def level(url: str, prompts: list[str], concurrency: int, tokens: int, rounds: int) -> dict:
    speeds, results = [], []
    for round_ in range(rounds):
        chosen = [prompts[(round_ * concurrency + i) % len(prompts)] for i in range(concurrency)]
        out: list[dict] = [{} for _ in chosen]
        start_at = time.perf_counter()
        threads = [threading.Thread(target=lambda i=i, p=p: out.__setitem__(i, {"prompt": p, **request(url, p, tokens)}))
                   for i, p in enumerate(chosen)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        speeds.append(sum(r["tokens"] for r in out) / (time.perf_counter() - start_at))
        results += out
    ttft = [r["ttft"] for r in results]
    total = [r["seconds"] for r in results]
    return {"concurrency": concurrency, "tok_s": round(statistics.median(speeds), 1),
            "ttft_p50_ms": round(1000 * _quantile(ttft, 50)), "ttft_p95_ms": round(1000 * _quantile(ttft, 95)),
            "latency_p50_s": round(_quantile(total, 50), 2), "latency_p95_s": round(_quantile(total, 95), 2),
            "results": results}


def _quantile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def run_levels(bundle: str, parallel: int, levels: list[int], tokens: int, rounds: int, threads: int | None) -> str:
    """The report (JSON text) of every concurrency level, against one stream, on one server."""
    prompts = held_out_chat_prompts()[:16]
    process, url = start(bundle, parallel, threads)
    try:
        alone = {p: request(url, p, tokens)["text"] for p in prompts[:max(levels) * rounds]}
        rows = [level(url, prompts, c, tokens, rounds) for c in levels]
    finally:
        process.terminate()
        process.wait(timeout=30)
    base = next((r["tok_s"] for r in rows if r["concurrency"] == 1), None)
    for row in rows:
        results = row.pop("results")
        row["identical"] = f"{sum(r['text'] == alone.get(r['prompt'], r['text']) for r in results)}/{len(results)}"
        row["x_one_stream"] = round(row["tok_s"] / base, 2) if base else None
    return json.dumps({"bundle": bundle, "host": cpu_model(), "python": platform.python_version(), "parallel": parallel,
                       "tokens": tokens, "rounds": rounds, "levels": rows}, indent=2)
