"""`edgelm serve` on 127.0.0.1 with the tiny bundle, driven by the official openai client:
chat and completions, streaming and not, stop, max_tokens; queue full -> 429; bad requests -> 400."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(bundle, *extra: str):
    port = _free_port()
    process = subprocess.Popen([sys.executable, "-m", "edgelm.cli", "serve", str(bundle), "--port", str(port),
                                "--threads", "1", *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as response:
                if json.load(response)["status"] == "ok":
                    return process, f"http://127.0.0.1:{port}"
        except OSError:
            if process.poll() is not None:
                raise AssertionError(process.stdout.read())
            time.sleep(0.2)
    process.kill()
    raise AssertionError("server did not start")


@contextlib.contextmanager
def serving(bundle, *extra: str):
    """`edgelm serve BUNDLE` on a free port for the block: yields its base URL, stops it after."""
    process, url = _start(bundle, *extra)
    try:
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def openai_client(url: str):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def server(tiny_bundle):
    with serving(tiny_bundle) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


def _post(url: str, body: bytes, content_type: str = "application/json") -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


def test_models_and_health(client, tiny_bundle):
    assert [m.id for m in client.models.list().data] == [tiny_bundle.name]


def test_chat_completion_streaming_and_not_agree(client, tiny_bundle):
    messages = [{"role": "user", "content": "Say something."}]
    full = client.chat.completions.create(model=tiny_bundle.name, messages=messages, max_tokens=6, temperature=0)
    text = full.choices[0].message.content
    assert full.choices[0].finish_reason in ("length", "stop") and full.usage.completion_tokens <= 6
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    chunks = client.chat.completions.create(model=tiny_bundle.name, messages=messages, max_tokens=6, temperature=0,
                                            stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed == text


def test_completions_with_max_tokens_and_stop(client, tiny_bundle):
    full = client.completions.create(model=tiny_bundle.name, prompt="The weather today", max_tokens=12, temperature=0)
    text = full.choices[0].text
    assert full.usage.completion_tokens <= 12 and full.choices[0].finish_reason in ("length", "stop")
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=tiny_bundle.name, prompt="The weather today", max_tokens=12, temperature=0, stream=True))
    assert streamed == text
    if len(text.strip()) > 2:
        stop = text.strip()[1:3]
        cut = client.completions.create(model=tiny_bundle.name, prompt="The weather today", max_tokens=12,
                                        temperature=0, stop=[stop])
        assert stop not in cut.choices[0].text and text.startswith(cut.choices[0].text)
        assert cut.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(("body", "message"), [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    (json.dumps({"messages": []}).encode(), "messages"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}).encode(), "temperature"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "top_p": 2}).encode(), "top_p"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}).encode(), "max_tokens"),
])
def test_bad_requests_get_400_with_an_openai_error(server, body, message):
    status, data = _post(server + "/v1/chat/completions", body)
    assert status == 400 and data["error"]["type"] == "invalid_request_error" and message in data["error"]["message"]


def test_oversized_body_gets_413(server):
    status, data = _post(server + "/v1/completions", json.dumps({"prompt": "x" * (2 << 20)}).encode())
    assert status == 413 and "body" in data["error"]["message"]


def test_a_full_queue_answers_429_and_the_server_recovers(tiny_bundle):
    from concurrent.futures import ThreadPoolExecutor

    process, url = _start(tiny_bundle, "--queue", "0")
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)

        def ask(_: int) -> str:
            try:
                client.completions.create(model=tiny_bundle.name, prompt="Once upon a time", max_tokens=200)
                return "ok"
            except openai.RateLimitError:
                return "429"

        with ThreadPoolExecutor(6) as pool:  # six at once, room for one: the others are turned away
            outcomes = list(pool.map(ask, range(6)))
        assert "ok" in outcomes and "429" in outcomes and set(outcomes) == {"ok", "429"}

        stream = client.completions.create(model=tiny_bundle.name, prompt="Once upon a time", max_tokens=200,
                                           temperature=0, stream=True)
        next(iter(stream))
        stream.close()  # the client goes away mid-stream; the model must be released
        deadline = time.monotonic() + 30
        while True:
            try:
                done = client.completions.create(model=tiny_bundle.name, prompt="hi", max_tokens=2)
                break
            except openai.RateLimitError:
                assert time.monotonic() < deadline, "the abandoned generation never released the model"
                time.sleep(0.1)
        assert done.usage.completion_tokens <= 2
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_binds_loopback_by_default():
    import inspect

    from edgelm.cli import serve

    assert inspect.signature(serve).parameters["host"].default.default == "127.0.0.1"


def test_api_key_is_required_when_set(tiny_bundle):
    process, url = _start(tiny_bundle, "--api-key", "s3cret")
    try:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model=tiny_bundle.name, prompt="hi", max_tokens=2).usage.completion_tokens <= 2
        status, data = _post(url + "/v1/completions", json.dumps({"prompt": "hi"}).encode())
        assert status == 401 and data["error"]["type"] == "authentication_error"
        with urllib.request.urlopen(url + "/health", timeout=5) as response:  # health needs no key
            assert response.status == 200
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_streamed_usage_with_the_openai_client(client, tiny_bundle):
    chunks = list(client.chat.completions.create(model=tiny_bundle.name, messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=4, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 4
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + chunks[-1].usage.completion_tokens


def test_fields_the_server_cannot_honour_are_refused_not_ignored(client, tiny_bundle):
    with pytest.raises(openai.BadRequestError, match="echo is not supported"):
        client.completions.create(model=tiny_bundle.name, prompt="hi", max_tokens=2, echo=True)
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.completions.create(model="gpt-4o", prompt="hi", max_tokens=2)
