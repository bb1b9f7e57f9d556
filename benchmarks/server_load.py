"""A bounded load test of `edgelm serve` on 127.0.0.1: many clients, a mix of requests, some hostile.

    python benchmarks/server_load.py dist/smollm2-int8 --clients 32 --seconds 60 --queue 64
    python benchmarks/server_load.py dist/smollm2-int8 --clients 8 --hostile 8 --seconds 60
    python benchmarks/server_load.py dist/smollm2-int8 --parallel 8 --concurrency 1 2 4 8 --tokens 96 --rounds 3

--concurrency measures batching instead (server_concurrency.py): throughput, TTFT and latency
percentiles at each number of concurrent streams, against one stream in the same run.

Starts the server, then runs --clients normal threads and --hostile hostile ones until --seconds
pass. A normal client loops, choosing (seeded) a non-streaming completion, a streaming chat
completion read to the end, or a streaming one it abandons after the first chunk. A hostile
client loops over an oversized history (3,000 short messages, or 1,000 of 900 characters: ~1 MB),
a slow upload (800 KB announced, dripped until the server's 408), a non-streaming client that
hangs up mid-generation, 100,000-deep JSON and 10,000 stop strings. /health is polled every
0.1 s throughout. Reports the host, status counts (a normal request must get 200 or 429, a
hostile one its expected status; anything else, a 500 above all, is a failure), /health latency
(p50, p99, max; the target is p99 < 100 ms), requests per second, and the server's RSS at start
and end (a leak shows as growth)."""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path


def host() -> str:
    from edgelm_runtime.hardware import describe_host

    load = ", load %.2f %.2f %.2f" % os.getloadavg() if hasattr(os, "getloadavg") else ""
    return describe_host() + load


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def request(port: int, path: str, body: dict | bytes, abandon: bool = False, hang_up_after: float | None = None) -> int:
    """The response's status; -1 if the connection failed; 0 if we hung up on purpose first."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        connection.request("POST", path, raw, {"Content-Type": "application/json"})
        if hang_up_after is not None:
            time.sleep(hang_up_after)
            connection.sock.shutdown(socket.SHUT_RDWR)
            return 0
        response = connection.getresponse()
        if abandon and response.status == 200:
            response.read1(64)  # the first chunk, then hang up mid-stream
            connection.sock.shutdown(socket.SHUT_RDWR)
            return 200
        response.read()
        return response.status
    except OSError:
        return -1
    finally:
        connection.close()


def slow_upload(port: int, total: int = 800_000, step: int = 1000, pause: float = 0.05) -> int:
    """Announce `total` bytes and drip them until the server answers (408 once its body deadline passes)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {total}\r\n\r\n".encode() + b'{"prompt": "')
            sock.settimeout(pause)
            for _ in range(total // step):
                try:
                    if sock.recv(1, socket.MSG_PEEK):
                        break
                except socket.timeout:
                    pass
                sock.sendall(b"x" * step)
            sock.settimeout(60)
            return int(sock.recv(64).split(b" ")[1])
    except (OSError, IndexError, ValueError):
        return -1


def history(count: int, size: int) -> dict:
    turns = [{"role": "user" if i % 2 else "assistant", "content": f"message {i} " + "x" * size}
             for i in range(count - 1, 0, -1)]
    return {"messages": [*turns, {"role": "user", "content": "and now?"}], "max_tokens": 8}


HOSTILE = {  # kind: (send(port) -> status, the status it must get; 0: we hung up first)
    "history-3000": (lambda port: request(port, "/v1/chat/completions", history(3000, 10)), 200),
    "history-1MB": (lambda port: request(port, "/v1/chat/completions", history(1000, 900)), 200),
    "slow-upload": (slow_upload, 408),
    "hang-up-non-stream": (lambda port: request(port, "/v1/completions", {"prompt": "Once upon a time",
                                                                         "max_tokens": 200}, hang_up_after=0.2), 0),
    "deep-json": (lambda port: request(port, "/v1/completions", b"[" * 100_000 + b"]" * 100_000), 400),
    "10000-stops": (lambda port: request(port, "/v1/completions", {"prompt": "hi", "stop": ["x"] * 10_000}), 400),
}


def client(port: int, seed: int, deadline: float, counts: Counter, lock: threading.Lock) -> None:
    rng = random.Random(seed)
    while time.monotonic() < deadline:
        kind = rng.choice(["complete", "chat-stream", "abandon"])
        if kind == "complete":
            status = request(port, "/v1/completions", {"prompt": "Once upon a time", "max_tokens": rng.randint(4, 32)})
        else:
            body = {"messages": [{"role": "user", "content": "Tell me about lighthouses."}],
                    "max_tokens": rng.randint(8, 48), "stream": True}
            status = request(port, "/v1/chat/completions", body, abandon=kind == "abandon")
        with lock:
            counts[(kind, status)] += 1


def hostile_client(port: int, seed: int, deadline: float, counts: Counter, lock: threading.Lock) -> None:
    rng = random.Random(-1 - seed)
    while time.monotonic() < deadline:
        kind = rng.choice(sorted(HOSTILE))
        status = HOSTILE[kind][0](port)
        with lock:
            counts[(kind, status)] += 1


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--hostile", type=int, default=0, help="hostile clients beside the normal ones")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--queue", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parallel", type=int, default=1, help="the server's --parallel (batched generations)")
    parser.add_argument("--concurrency", type=int, nargs="+", help="measure these numbers of concurrent streams")
    parser.add_argument("--tokens", type=int, default=96, help="with --concurrency: new tokens per request")
    parser.add_argument("--rounds", type=int, default=3, help="with --concurrency: rounds per level")
    args = parser.parse_args()
    if args.concurrency:
        from server_concurrency import run_levels  # benchmarks/ is the script's folder

        print(run_levels(args.bundle, args.parallel, args.concurrency, args.tokens, args.rounds, args.threads))
        return
    print(f"host: {host()}")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log_file = tempfile.TemporaryFile("w+")  # the server's log: a pipe nobody reads could block it
    server = subprocess.Popen([sys.executable, "-m", "edgelm.cli", "serve", args.bundle, "--port", str(port),
                               "--queue", str(args.queue), "--threads", str(args.threads),
                               "--parallel", str(args.parallel)],
                              stdout=subprocess.DEVNULL, stderr=log_file, text=True)
    try:
        for _ in range(300):
            try:
                http.client.HTTPConnection("127.0.0.1", port, timeout=1).request("GET", "/health")
                break
            except OSError:
                time.sleep(0.2)
        request(port, "/v1/completions", {"prompt": "warm up", "max_tokens": 4})
        rss_start = rss_mb(server.pid)
        counts: Counter = Counter()
        lock = threading.Lock()
        deadline = time.monotonic() + args.seconds
        health: list[float] = []
        health_failures = 0

        def poll_health() -> None:
            nonlocal health_failures
            while time.monotonic() < deadline:
                start = time.perf_counter()
                try:
                    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                    connection.request("GET", "/health")
                    ok = connection.getresponse().status == 200
                    connection.close()
                except OSError:
                    ok = False
                if ok:
                    health.append(time.perf_counter() - start)
                else:
                    health_failures += 1
                time.sleep(0.1)

        threads = [threading.Thread(target=client, args=(port, i, deadline, counts, lock)) for i in range(args.clients)]
        threads += [threading.Thread(target=hostile_client, args=(port, i, deadline, counts, lock))
                    for i in range(args.hostile)]
        threads.append(threading.Thread(target=poll_health))
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - started
        rss_end = rss_mb(server.pid)
        alive = server.poll() is None
    finally:
        server.terminate()
        server.wait(timeout=30)
        log_file.seek(0)
        log = log_file.read()
        if os.environ.get("SERVER_LOAD_LOG"):
            Path(os.environ["SERVER_LOAD_LOG"]).write_text(log)
    total = sum(counts.values())
    expected = {kind: status for kind, (_, status) in HOSTILE.items()}
    failures = sum(n for (kind, status), n in counts.items()
                   if (status != expected[kind] if kind in expected else status not in (200, 429)))
    print(f"{args.clients} clients + {args.hostile} hostile, {elapsed:.0f} s, queue {args.queue}: {total} requests "
          f"({total / elapsed:.1f}/s), failures: {failures}, server alive: {alive}")
    for (kind, status), n in sorted(counts.items()):
        print(f"  {kind:<18} {status}: {n}")
    ms = [h * 1e3 for h in health]
    print(f"/health: {len(health)} answered, {health_failures} failed, p50 {statistics.median(ms):.1f} ms, "
          f"p99 {percentile(ms, 0.99):.1f} ms, max {max(ms):.1f} ms (target p99 < 100 ms)")
    print(f"server RSS: {rss_start:.0f} MB at start, {rss_end:.0f} MB at end; "
          f"server log: {len(log.splitlines())} lines")


if __name__ == "__main__":
    main()
