"""A bounded load test of `edgelm serve` on 127.0.0.1: many clients, a mix of requests, some leaving.

    python benchmarks/server_load.py dist/smollm2-int8 --clients 32 --seconds 60 --queue 64

Starts the server, then runs --clients threads until --seconds pass. Each client loops, choosing
(seeded) a non-streaming completion, a streaming chat completion read to the end, or a streaming
one it abandons after the first chunk. Meanwhile /health is polled twice a second. Reports status
counts (anything but 200 and 429 is a failure), /health latency, requests per second, and the
server's RSS at start and end (a leak shows as growth)."""

from __future__ import annotations

import argparse
import http.client
import json
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def request(port: int, path: str, body: dict, abandon: bool = False) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--queue", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "edgelm.cli", "serve", args.bundle, "--port", str(port),
                               "--queue", str(args.queue), "--threads", str(args.threads)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
                time.sleep(0.5)

        threads = [threading.Thread(target=client, args=(port, i, deadline, counts, lock)) for i in range(args.clients)]
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
    total = sum(counts.values())
    failures = sum(n for (kind, status), n in counts.items() if status not in (200, 429))
    print(f"{args.clients} clients, {elapsed:.0f} s, queue {args.queue}: {total} requests "
          f"({total / elapsed:.1f}/s), failures (not 200/429): {failures}, server alive: {alive}")
    for (kind, status), n in sorted(counts.items()):
        print(f"  {kind:<12} {status}: {n}")
    print(f"/health: {len(health)} answered, {health_failures} failed, median {statistics.median(health) * 1e3:.1f} ms, "
          f"max {max(health) * 1e3:.1f} ms")
    print(f"server RSS: {rss_start:.0f} MB at start, {rss_end:.0f} MB at end")


if __name__ == "__main__":
    main()
