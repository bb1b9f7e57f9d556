"""`edgelm serve` against hostile clients, on a real uvicorn in a subprocess.

While each attack runs, /health must answer within 1 s (one request used to freeze the whole
server); every bad body gets a 4xx JSON error naming its field, never a 500; error bodies hold no
path of the server's machine; an aborted upload logs one line; an empty API key is refused."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

BODY_SECONDS, MAX_UPLOADS, SLOW_DECODE_S = 2.0, 4, 0.05
# Serves a bundle with test-sized limits; with a slow decode (and no eos) a long generation takes
# seconds, so a generation that is not cancelled shows.
LAUNCH = """
import dataclasses, sys, time
import edgelm_runtime as er
from edgelm_runtime.server import Limits, serve
bundle, port, slow = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
llm = er.load_bundle(bundle, threads=1)
if slow:
    class SlowDecoder:
        def __init__(self, decoder): self._decoder = decoder
        def __getattr__(self, name): return getattr(self._decoder, name)
        def stepper(self, capacity):
            stepper = self._decoder.stepper(capacity)
            feed = stepper.feed
            stepper.feed = lambda ids: (time.sleep(slow), feed(ids))[1]
            return stepper
    llm._decoder = SlowDecoder(llm._decoder)
    llm._manifest = dataclasses.replace(llm.manifest, eos_token_ids=())
serve(llm, port=port, limits=Limits(body_seconds=%r, max_uploads=%r))
""" % (BODY_SECONDS, MAX_UPLOADS)
ABSOLUTE_PATH = re.compile(r"(?<![\w.:/])/(?:[\w.-]+/)+[\w.-]*")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(bundle: Path, slow: float = 0.0, log: Path | None = None):
    port = _free_port()
    out = open(log, "w") if log else subprocess.DEVNULL  # closed by stop()
    process = subprocess.Popen([sys.executable, "-c", LAUNCH, str(bundle), str(port), str(slow)],
                               stdout=subprocess.DEVNULL, stderr=out)
    process.log = out
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if http(port, "GET", "/health", timeout=1)[0] == 200:
                return process, port
        except OSError:
            assert process.poll() is None, f"the server exited: {log.read_text() if log else ''}"
            time.sleep(0.2)
    process.kill()
    raise AssertionError("server did not start")


def stop(process) -> None:
    process.terminate()
    process.wait(timeout=30)
    if process.log is not subprocess.DEVNULL:
        process.log.close()


def http(port: int, method: str, path: str, body: bytes = b"", timeout: float = 30,
         headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """One request on a fresh connection: (status, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        head = {"Host": "127.0.0.1", "Content-Type": "application/json", "Content-Length": str(len(body)),
                "Connection": "close", **(headers or {})}
        sock.sendall(f"{method} {path} HTTP/1.1\r\n".encode()
                     + "".join(f"{k}: {v}\r\n" for k, v in head.items()).encode() + b"\r\n" + body)
        return _response(sock)


def _response(sock: socket.socket) -> tuple[int, bytes]:
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:  # a server that closes on an unread body may reset after its answer
        pass
    assert data, "no response"
    head, _, rest = data.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in head.lower():
        body = b""
        while rest:
            size, _, rest = rest.partition(b"\r\n")
            body, rest = body + rest[:int(size, 16)], rest[int(size, 16) + 2:]
        rest = body
    return int(head.split(b" ")[1]), rest


def health_ms(port: int) -> float:
    start = time.perf_counter()
    status, _ = http(port, "GET", "/health", timeout=5)
    assert status == 200
    return (time.perf_counter() - start) * 1e3


@pytest.fixture(scope="module")
def server(tiny_bundle):
    process, port = launch(tiny_bundle, slow=SLOW_DECODE_S)
    yield port
    stop(process)


def chat(messages: list, **fields) -> bytes:
    return json.dumps({"messages": messages, "max_tokens": 4, **fields}).encode()


def history(count: int, size: int = 10) -> list[dict]:
    """`count` alternating turns of `size` characters each, the last one (a user turn) short."""
    turns = [{"role": "user" if i % 2 else "assistant", "content": f"message {i} " + "x" * size}
             for i in range(count - 1, 0, -1)]
    return [*turns, {"role": "user", "content": "and now?"}]


def slow_upload(port: int, total: int = 800_000, step: int = 1000, pause: float = 0.05) -> tuple[int, bytes]:
    """Announce `total` bytes, then drip them; the server's answer (a 408) ends it."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {total}\r\n\r\n".encode() + b'{"prompt": "')
        sock.settimeout(pause)
        sent = 0
        while sent < total:
            try:
                if sock.recv(1, socket.MSG_PEEK):
                    break
            except socket.timeout:
                pass
            try:
                sock.sendall(b"x" * step)
            except OSError:
                break
            sent += step
        sock.settimeout(30)
        return _response(sock)


def disconnect_mid_generation(port: int) -> tuple[int, bytes]:
    """A non-streaming client that asks for a long answer and hangs up after half a second."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        body = json.dumps({"prompt": "Once upon a time", "max_tokens": 200}).encode()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        time.sleep(0.5)
    start = time.monotonic()  # the model must be free again at once, not after 200 slow tokens (10 s)
    status, data = http(port, "POST", "/v1/completions", json.dumps({"prompt": "hi", "max_tokens": 2}).encode())
    assert time.monotonic() - start < 3, "the abandoned generation kept the model"
    return status, data


ATTACKS = {  # name: (attack(port) -> (status, body), expected status, expected param)
    "history-3000-messages": (lambda p: http(p, "POST", "/v1/chat/completions", chat(history(3000))), 200, None),
    "history-1MB": (lambda p: http(p, "POST", "/v1/chat/completions", chat(history(1000, 900))), 200, None),
    "history-over-the-cap": (lambda p: http(p, "POST", "/v1/chat/completions", chat(history(5000, 0))), 400,
                             "messages"),
    "deep-json": (lambda p: http(p, "POST", "/v1/completions", b"[" * 100_000 + b"]" * 100_000), 400, None),
    "lone-surrogate": (lambda p: http(p, "POST", "/v1/completions", b'{"prompt": "a\\ud800"}'), 400, "prompt"),
    "10000-stop-strings": (lambda p: http(p, "POST", "/v1/completions",
                                          json.dumps({"prompt": "hi", "stop": ["x"] * 10_000}).encode()), 400, "stop"),
    "slow-upload": (slow_upload, 408, None),
    "disconnecting-non-streaming-client": (disconnect_mid_generation, 200, None),
}


@pytest.mark.parametrize("name", list(ATTACKS))
def test_health_answers_within_a_second_while_a_hostile_request_runs(server, name):
    attack, status, param = ATTACKS[name]
    outcomes: list = []

    def run() -> None:
        start = time.monotonic()
        while not outcomes or time.monotonic() - start < 1.5:  # long enough to poll /health during it
            outcomes.append(attack(server))

    thread = threading.Thread(target=run)
    thread.start()
    latencies = []
    while thread.is_alive():
        latencies.append(health_ms(server))
        time.sleep(0.05)
    thread.join()
    assert latencies and max(latencies) < 1000, f"/health took {max(latencies):.0f} ms during {name}"
    for got, data in outcomes:
        assert got == status, data[:300]
        if status >= 400:
            error = json.loads(data)["error"]
            assert error["param"] == param and error["message"] and "\n" not in error["message"]


def test_concurrent_uploads_are_capped(server):
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(slow_upload(server))) for _ in range(MAX_UPLOADS)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)  # all of them are uploading now
    status, data = http(server, "POST", "/v1/completions", json.dumps({"prompt": "hi"}).encode())
    assert status == 503 and "request bodies" in json.loads(data)["error"]["message"]
    for thread in threads:
        thread.join()
    assert [status for status, _ in results] == [408] * MAX_UPLOADS
    assert http(server, "POST", "/v1/completions", json.dumps({"prompt": "hi", "max_tokens": 1}).encode())[0] == 200


HI = [{"role": "user", "content": "hi"}]
BAD_BODIES = [  # (path, body, status, param)
    ("chat", b"", 400, None),
    ("chat", b"\xff\xfe{}", 400, None),
    ("chat", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400, None),
    ("chat", b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1' + b"0" * 5000 + b"}", 400, None),
    ("chat", {"messages": "hi"}, 400, "messages"),
    ("chat", {"messages": [{"role": 1, "content": "hi"}]}, 400, "messages[0].role"),
    ("chat", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "messages[0].content[0]"),
    ("chat", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role"),
    ("chat", {"messages": [{"role": "tool", "content": "42"}]}, 400, "messages[0].tool_call_id"),
    ("chat", {"messages": [{"role": "user", "content": None}]}, 400, "messages[0].content"),
    ("chat", {"messages": [{"role": "user", "content": "hi", "tool_calls": [{"id": 1}]}]}, 400,
     "messages[0].tool_calls"),
    ("chat", {"messages": ["hi"]}, 400, "messages[0]"),
    ("chat", {"messages": HI, "stream": "no"}, 400, "stream"),
    ("chat", {"messages": HI, "stream": 1}, 400, "stream"),
    ("chat", {"messages": HI, "max_tokens": "5"}, 400, "max_tokens"),
    ("chat", {"messages": HI, "max_tokens": 5.5}, 400, "max_tokens"),
    ("chat", {"messages": HI, "max_tokens": True}, 400, "max_tokens"),
    ("chat", {"messages": HI, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    ("chat", {"messages": HI, "temperature": "0.5"}, 400, "temperature"),
    ("chat", {"messages": HI, "temperature": True}, 400, "temperature"),
    ("chat", {"messages": HI, "top_p": []}, 400, "top_p"),
    ("chat", {"messages": HI, "top_k": 1.5}, 400, "top_k"),
    ("chat", {"messages": HI, "seed": -1}, 400, "seed"),
    ("chat", {"messages": HI, "seed": "1"}, 400, "seed"),
    ("chat", {"messages": HI, "n": 17}, 400, "n"),
    ("chat", {"messages": HI, "n": 0}, 400, "n"),
    ("chat", {"messages": HI, "logprobs": 1}, 400, "logprobs"),
    ("chat", {"messages": HI, "top_logprobs": 2}, 400, "top_logprobs"),
    ("chat", {"messages": HI, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ("chat", {"messages": HI, "presence_penalty": 2.5}, 400, "presence_penalty"),
    ("chat", {"messages": HI, "frequency_penalty": "1"}, 400, "frequency_penalty"),
    ("chat", {"messages": HI, "logit_bias": {"5": 3}}, 400, "logit_bias"),
    ("chat", {"messages": HI, "tools": [{"type": "function"}]}, 400, "tools[0]"),
    ("chat", {"messages": HI, "tools": [{"type": "function", "function": {"name": "has space"}}]}, 400,
     "tools[0].function.name"),
    ("chat", {"messages": HI, "tool_choice": "required"}, 400, "tool_choice"),
    ("chat", {"messages": HI, "tools": [{"type": "function", "function": {"name": "f"}}],
              "tool_choice": {"type": "function", "function": {"name": "g"}}}, 400, "tool_choice"),
    ("chat", {"messages": HI, "response_format": {"type": "xml"}}, 400, "response_format"),
    ("chat", {"messages": HI, "response_format": {"type": "json_schema", "json_schema": {"name": "x",
              "schema": {"type": "nope"}}}}, 400, "response_format"),
    ("chat", {"messages": HI, "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}],
              "tool_choice": "required"}, 400, "tool_choice"),
    ("chat", {"messages": HI, "stop": 5}, 400, "stop"),
    ("chat", {"messages": HI, "stop": [""]}, 400, "stop"),
    ("chat", {"messages": HI, "stop": ["x"] * 17}, 400, "stop"),
    ("chat", {"messages": HI, "stop": "x" * 300}, 400, "stop"),
    ("chat", {"messages": HI, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("chat", {"messages": HI, "user": 5}, 400, "user"),
    ("chat", {"messages": HI, "model": 5}, 400, "model"),
    ("chat", {"messages": HI, "model": "some-other-model"}, 404, "model"),
    ("chat", {"messages": HI, "frobnicate": 1}, 400, "frobnicate"),
    ("chat", {"messages": [{"role": "user", "content": "word " * 400}]}, 400, "messages"),
    ("chat", {"messages": [{"role": "system", "content": "only a system prompt"}]}, 400, "messages"),
    ("completions", b'{"prompt": "a\\udfff b"}', 400, "prompt"),
    ("completions", b'{"prompt": "hi", "stop": ["\\ud800"]}', 400, "stop"),
    ("chat", b'{"messages": [{"role": "user\\ud800", "content": "hi"}]}', 400, "messages[0].role"),
    ("chat", b'{"messages": [{"role": "user", "content": "hi"}], "\\ud800": 1}', 400, "\\ud800"),
    ("completions", {"prompt": 5}, 400, "prompt"),
    ("completions", {"prompt": ["a", "b"]}, 400, "prompt"),
    ("completions", {"prompt": "hi", "echo": True}, 400, "echo"),
    ("completions", {"prompt": "hi", "logprobs": 6}, 400, "logprobs"),
    ("completions", {"prompt": "hi", "response_format": {"type": "json_object"}}, 400, "response_format"),
    ("completions", {"prompt": "hi", "messages": HI}, 400, "messages"),
    ("completions", {"prompt": "word " * 400}, 400, "prompt"),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), BAD_BODIES)
def test_bad_bodies_get_a_4xx_json_error_naming_the_field(server, tiny_bundle, path, body, status, param):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    got, data = http(server, "POST", "/v1/chat/completions" if path == "chat" else "/v1/completions", raw)
    assert got == status, data[:300]
    error = json.loads(data)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert error["type"] == "invalid_request_error" and "\n" not in error["message"]
    assert "Traceback" not in error["message"] and str(tiny_bundle.parent) not in error["message"]


@pytest.mark.parametrize(("method", "path"), [("GET", "/nowhere"), ("GET", "/v1/completions")])
def test_unknown_routes_and_methods_get_json_errors(server, method, path):
    status, data = http(server, method, path)
    assert status in (404, 405) and json.loads(data)["error"]["message"]


def test_include_usage_adds_a_usage_chunk(server):
    status, data = http(server, "POST", "/v1/completions", json.dumps(
        {"prompt": "hi", "max_tokens": 2, "stream": True, "stream_options": {"include_usage": True}}).encode())
    events = [json.loads(line[6:]) for line in data.decode().splitlines() if line.startswith("data: {")]
    assert status == 200 and events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 2


def test_error_bodies_hold_no_server_path(bundle_copy, edit_manifest, tmp_path):
    (bundle_copy / "templates" / "chat.jinja").write_text(
        "{% if messages[0]['content'] == 'loop' %}{% for i in range(100000) %}{% for j in range(100000) %}"
        "{% endfor %}{% endfor %}{% endif %}{{ raise_exception('refused: ' ~ messages[0]['content']) }}")
    edit_manifest(bundle_copy, lambda m: None, relist_files=True)
    process, port = launch(bundle_copy, log=tmp_path / "server.log")
    try:
        for content in ("hello", "loop"):
            status, data = http(port, "POST", "/v1/chat/completions", chat([{"role": "user", "content": content}]))
            message = json.loads(data)["error"]["message"]
            assert status == 400 and ("refused: hello" in message or "longer than" in message), message
            assert str(bundle_copy.resolve()) not in message and str(tmp_path) not in message
            assert not ABSOLUTE_PATH.search(message), message
    finally:
        stop(process)


def test_an_aborted_upload_logs_one_line(tiny_bundle, tmp_path):
    log = tmp_path / "server.log"
    process, port = launch(tiny_bundle, log=log)
    try:
        for _ in range(5):
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
                             + b"x" * 5000)
                time.sleep(0.1)
        time.sleep(0.5)
        assert http(port, "GET", "/health")[0] == 200
    finally:
        stop(process)
    lines = log.read_text().splitlines()
    assert len(lines) == 5 and all("left during its upload" in line for line in lines), lines


def test_clients_that_hang_up_leave_the_log_quiet(tiny_bundle, tmp_path):
    """Streams abandoned after one chunk and non-streaming clients that hang up: no log lines
    (asyncio logs one per write to a lost socket; a stream that kept writing flooded the log)."""
    log = tmp_path / "server.log"
    process, port = launch(tiny_bundle, log=log)
    try:
        body = json.dumps({"prompt": "Once upon a time", "max_tokens": 200, "stream": True}).encode()
        for stream in (True, False) * 10:
            with socket.create_connection(("127.0.0.1", port)) as sock:
                raw = body if stream else body.replace(b'"stream": true', b'"stream": false')
                sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             + f"Content-Length: {len(raw)}\r\n\r\n".encode() + raw)
                if stream:
                    sock.recv(256)  # the headers and the first event, then hang up
        time.sleep(1.0)
        assert http(port, "GET", "/health")[0] == 200
    finally:
        stop(process)
    assert log.read_text().splitlines() == []


def test_an_empty_api_key_is_refused(llm, monkeypatch):
    import edgelm_runtime as er
    from edgelm_runtime.server import create_app, serve

    for key in ("", "  "):
        with pytest.raises(er.GenerationError, match="API key is empty"):
            create_app(llm, api_key=key)
        with pytest.raises(er.GenerationError, match="API key is empty"):
            serve(llm, port=_free_port(), api_key=key)  # refused before anything binds
    monkeypatch.setenv("EDGELM_API_KEY", "")
    with pytest.raises(er.GenerationError, match="API key is empty"):
        serve(llm, port=_free_port())


def _cli_serve(bundle: Path, *extra: str, env: dict[str, str]) -> tuple[int | None, str]:
    """(exit code, stderr) of `edgelm serve`, or (None, ...) if it was still serving after 15 s."""
    import os

    command = [sys.executable, "-m", "edgelm.cli", "serve", str(bundle), "--port", str(_free_port()), *extra]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, **env})
    try:
        return process.wait(timeout=15), process.stderr.read()
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return None, "still serving"


@pytest.mark.parametrize("extra", [("--api-key", ""), ()])
def test_the_cli_refuses_an_empty_api_key(tiny_bundle, extra):
    """`--api-key ""`, and EDGELM_API_KEY set but empty (click reads that as unset: serve() checks it)."""
    code, stderr = _cli_serve(tiny_bundle, *extra, env={"EDGELM_API_KEY": ""})
    assert code == 2 and "that would serve without authentication" in stderr, stderr


def test_a_prompt_that_cannot_be_prepared_in_time_gets_503(llm):
    from edgelm_runtime.requests import RequestError, prepare

    raw = chat(history(3000))
    with pytest.raises(RequestError) as caught:
        prepare(raw, True, llm, deadline=time.monotonic() - 1)
    assert caught.value.status == 503 and caught.value.body()["error"]["code"] == "timeout"
    assert prepare(raw, True, llm, deadline=time.monotonic() + 60).ids  # in time: trimmed, served
