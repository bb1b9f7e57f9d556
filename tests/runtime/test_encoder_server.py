"""`edgelm serve` with encoder bundles, on 127.0.0.1 with the tiny BERT bundles: /v1/embeddings
through the official openai client (which asks for base64) and raw, /v1/classify, /v1/tag, the
decoder's endpoints refused with a 404 naming what is served, every bad field a 400 naming it,
and `--embeddings` beside a chat bundle."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")

import edgelm_runtime as er  # noqa: E402
from edgelm_runtime.encoder_server import MAX_INPUTS, EncoderRequest, encode  # noqa: E402

TEXTS = ["The weather in Paris is mild today.", "A warm, funny film.", "Anna moved to Oslo in 2019."]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    def __init__(self, log: Path, *args: str) -> None:
        self.log = log
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        with open(log, "w") as out:
            self.process = subprocess.Popen([sys.executable, "-m", "edgelm.cli", "serve", *args, "--port", str(port),
                                             "--threads", "1"], stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if self.get("/health")[0] == 200:
                    return
            except OSError:
                assert self.process.poll() is None, log.read_text()
                time.sleep(0.2)
        self.stop()
        raise AssertionError("server did not start")

    def post(self, path: str, body: dict | bytes, key: str | None = None) -> tuple[int, dict]:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        return self._open(urllib.request.Request(self.url + path, data=raw, headers=headers, method="POST"))

    def get(self, path: str) -> tuple[int, dict]:
        return self._open(urllib.request.Request(self.url + path), timeout=5)

    @staticmethod
    def _open(request: urllib.request.Request, timeout: float = 60) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as err:
            return err.code, json.load(err)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def bundles(tiny_encoder_bundles) -> dict[str, Path]:
    return tiny_encoder_bundles


@pytest.fixture(scope="module")
def models(bundles) -> dict[str, er.EncoderModel]:
    return {task: er.load_bundle(path, threads=1) for task, path in bundles.items()}


def _server(tmp_path_factory, *args: str):
    server = Server(tmp_path_factory.mktemp("log") / "server.log", *args)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def embedder(bundles, tmp_path_factory):
    yield from _server(tmp_path_factory, str(bundles["feature-extraction"]))


@pytest.fixture(scope="module")
def classifier(bundles, tmp_path_factory):
    yield from _server(tmp_path_factory, str(bundles["sequence-classification"]), "--api-key", "s3cret")


@pytest.fixture(scope="module")
def tagger(bundles, tmp_path_factory):
    yield from _server(tmp_path_factory, str(bundles["token-classification"]))


@pytest.fixture(scope="module")
def combined(tiny_bundle, bundles, tmp_path_factory):
    yield from _server(tmp_path_factory, str(tiny_bundle), "--embeddings", str(bundles["feature-extraction"]))


def _client(server: Server, key: str = "unused"):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)


def _tokens(model: er.EncoderModel, texts: list[str]) -> int:
    return sum(min(len(e.ids), model.manifest.encoder.max_length) for e in model.tokenizer.encode_batch(texts))


# --- /v1/embeddings -------------------------------------------------------------------------------

def test_the_openai_client_gets_the_librarys_embeddings(embedder, models):
    """The client asks for base64 unless told otherwise, and decodes little-endian float32."""
    model = models["feature-extraction"]
    reply = _client(embedder).embeddings.create(model=model.manifest.name, input=TEXTS)
    assert [d.index for d in reply.data] == [0, 1, 2] and reply.model == model.manifest.name
    got = np.array([d.embedding for d in reply.data], dtype=np.float32)
    np.testing.assert_allclose(got, model.embed(TEXTS), atol=1e-6)
    assert reply.usage.prompt_tokens == reply.usage.total_tokens == _tokens(model, TEXTS)
    floats = _client(embedder).embeddings.create(model=model.manifest.name, input="one text", encoding_format="float")
    assert len(floats.data) == 1 and len(floats.data[0].embedding) == model.dim


def test_base64_is_the_float_vector_bytes_exactly(embedder, models):
    dim = models["feature-extraction"].dim
    status, floats = embedder.post("/v1/embeddings", {"input": TEXTS, "dimensions": dim, "user": "ann"})
    status64, packed = embedder.post("/v1/embeddings", {"input": TEXTS, "encoding_format": "base64"})
    assert status == status64 == 200 and floats["object"] == "list"
    assert set(floats) == {"object", "data", "model", "usage"}
    assert set(floats["data"][0]) == {"object", "index", "embedding"} and floats["data"][0]["object"] == "embedding"
    for plain, encoded in zip(floats["data"], packed["data"]):
        vector = np.frombuffer(base64.b64decode(encoded["embedding"]), dtype="<f4")
        assert vector.shape == (dim,) and np.array_equal(vector, np.asarray(plain["embedding"], dtype=np.float32))


def test_an_over_long_input_is_truncated_quietly(embedder, models):
    model = models["feature-extraction"]
    long = "word " * 2000
    status, data = embedder.post("/v1/embeddings", {"input": [long, "short"], "encoding_format": "float"})
    assert status == 200 and data["usage"]["prompt_tokens"] == _tokens(model, [long, "short"])
    np.testing.assert_allclose(np.asarray(data["data"][0]["embedding"], dtype=np.float32), model.embed(long)[0],
                               atol=1e-6)
    time.sleep(0.2)
    assert "truncated" not in embedder.log.read_text()  # documented; a line per batch would flood the log


def test_models_and_health_name_the_encoder(embedder, models):
    name = models["feature-extraction"].manifest.name
    assert [m.id for m in _client(embedder).models.list().data] == [name]
    assert embedder.get("/health") == (200, {"status": "ok", "model": name})


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/classify", "/v1/tag"])
def test_other_endpoints_are_a_404_naming_the_served_one(embedder, path):
    status, data = embedder.post(path, {"messages": [{"role": "user", "content": "hi"}], "prompt": "hi"})
    error = data["error"]
    assert status == 404 and error["code"] == "endpoint_not_served", data
    assert path in error["message"] and "POST /v1/embeddings" in error["message"] and "feature-extraction" in error["message"]


def test_the_openai_client_sees_chat_on_an_encoder_server_as_not_found(embedder):
    with pytest.raises(openai.NotFoundError, match="/v1/embeddings"):
        _client(embedder).chat.completions.create(model="x", messages=[{"role": "user", "content": "hi"}])


BAD_EMBEDDINGS = [  # (body, status, param, words in the message)
    ({}, 400, "input", "input must be"),
    ({"input": 5}, 400, "input", "input must be"),
    ({"input": []}, 400, "input", "non-empty"),
    ({"input": ""}, 400, "input", "non-empty"),
    ({"input": [1, 2, 3]}, 400, "input", "send text"),
    ({"input": [[1, 2], [3]]}, 400, "input", "send text"),
    ({"input": ["a", 5]}, 400, "input[1]", "string"),
    ({"input": ["a", None]}, 400, "input[1]", "string"),
    ({"input": ["a", ""]}, 400, "input[1]", "non-empty"),
    (b'{"input": ["a", "b\\ud800"]}', 400, "input[1]", "surrogate"),
    ({"input": ["x"] * (MAX_INPUTS + 1)}, 400, "input", f"at most {MAX_INPUTS}"),
    ({"input": "a", "encoding_format": "hex"}, 400, "encoding_format", "base64"),
    ({"input": "a", "encoding_format": 1}, 400, "encoding_format", "base64"),
    ({"input": "a", "dimensions": 16}, 400, "dimensions", "cannot shorten"),
    ({"input": "a", "dimensions": True}, 400, "dimensions", "dimensions must be"),
    ({"input": "a", "dimensions": "32"}, 400, "dimensions", "dimensions must be"),
    ({"input": "a", "user": 5}, 400, "user", "user"),
    ({"input": "a", "model": 5}, 400, "model", "model must be"),
    ({"input": "a", "model": "text-embedding-3-small"}, 404, "model", "not served here"),
    ({"input": "a", "truncate": False}, 400, "truncate", "unknown field"),
    ({"input": "a", "messages": []}, 400, "messages", "unknown field"),
    (b"{not json", 400, None, "not valid JSON"),
    (b"[1]", 400, None, "JSON object"),
    (b'{"input": "a", "dimensions": NaN}', 400, None, "not valid JSON"),
]


@pytest.mark.parametrize(("body", "status", "param", "words"), BAD_EMBEDDINGS)
def test_bad_embedding_requests_name_their_field(embedder, bundles, body, status, param, words):
    got, data = embedder.post("/v1/embeddings", body)
    error = data["error"]
    assert got == status and error["param"] == param and words in error["message"], data
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert str(bundles["feature-extraction"].parent) not in error["message"]


def test_oversized_body_gets_413(embedder):
    """Refused on its Content-Length, before it is read (the body itself is never sent)."""
    host, port = embedder.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {2 << 20}\r\n\r\n".encode() + b'{"input": "')
        data = b""
        while chunk := sock.recv(65536):  # the server closes after a 413 (Connection: close)
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == b"413" and b"request body over" in body


def test_health_answers_while_a_full_request_encodes(embedder):
    """2,048 inputs run in a worker thread: /health keeps answering meanwhile."""
    body = {"input": [f"{TEXTS[i % 3]} {i}" for i in range(MAX_INPUTS)], "encoding_format": "float"}
    outcome: list = []
    worker = threading.Thread(target=lambda: outcome.append(embedder.post("/v1/embeddings", body)))
    worker.start()
    latencies = []
    while worker.is_alive():
        start = time.perf_counter()
        assert embedder.get("/health")[0] == 200
        latencies.append(time.perf_counter() - start)
        time.sleep(0.02)
    worker.join()
    status, data = outcome[0]
    assert status == 200 and [d["index"] for d in data["data"]] == list(range(MAX_INPUTS))
    assert latencies and max(latencies) < 1.0


def test_a_client_that_hangs_up_frees_the_model_at_the_next_batch(embedder):
    """The whole request takes seconds; after the hang-up the next one waits one batch at most."""
    body = json.dumps({"input": [f"text number {i} " * 30 for i in range(MAX_INPUTS)]}).encode()
    host, port = embedder.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        time.sleep(0.3)
    start = time.monotonic()
    assert embedder.post("/v1/embeddings", {"input": "hi"})[0] == 200
    assert time.monotonic() - start < 1.0, "the abandoned request kept the model"


def test_encode_stops_at_the_next_batch_once_cancelled(models):
    model = models["feature-extraction"]
    cancelled = threading.Event()
    cancelled.set()
    assert encode(model, EncoderRequest(TEXTS * 40), cancelled) is None
    body = json.loads(encode(model, EncoderRequest(TEXTS), threading.Event()))
    assert [d["index"] for d in body["data"]] == [0, 1, 2]


# --- /v1/classify ---------------------------------------------------------------------------------

def test_classify_answers_as_the_library_does(classifier, models):
    model = models["sequence-classification"]
    status, data = classifier.post("/v1/classify", {"model": model.manifest.name, "input": TEXTS}, key="s3cret")
    assert status == 200 and list(data) == ["object", "model", "data", "usage"] and data["object"] == "list"
    assert data["model"] == model.manifest.name and data["usage"]["prompt_tokens"] == _tokens(model, TEXTS)
    for item, expected in zip(data["data"], model.classify(TEXTS)):
        assert set(item) == {"index", "label", "score", "scores"}
        assert item["label"] == expected.label and set(item["scores"]) == {"negative", "positive"}
        assert item["score"] == item["scores"][item["label"]] == max(item["scores"].values())
        assert item["scores"] == pytest.approx(expected.scores, abs=1e-6) and sum(item["scores"].values()) == \
            pytest.approx(1.0, abs=1e-5)
    assert [item["index"] for item in data["data"]] == [0, 1, 2]
    status, one = classifier.post("/v1/classify", {"input": "A warm, funny film."}, key="s3cret")
    assert status == 200 and len(one["data"]) == 1


@pytest.mark.parametrize(("body", "param"), [({"input": ["a", 1]}, "input[1]"), ({"input": "a", "labels": ["x"]}, "labels"),
                                             ({"input": "a", "encoding_format": "float"}, "encoding_format"),
                                             ({"input": "a", "aggregation_strategy": "simple"}, "aggregation_strategy")])
def test_bad_classify_requests_name_their_field(classifier, body, param):
    status, data = classifier.post("/v1/classify", body, key="s3cret")
    assert status == 400 and data["error"]["param"] == param


def test_the_api_key_guards_encoder_endpoints_too(classifier):
    status, data = classifier.post("/v1/classify", {"input": "hi"})
    assert status == 401 and data["error"]["type"] == "authentication_error"
    assert classifier.post("/v1/embeddings", {"input": "hi"})[0] == 401  # no key: not even what is served
    assert classifier.post("/v1/embeddings", {"input": "hi"}, key="s3cret")[0] == 404
    assert classifier.get("/health")[0] == 200


# --- /v1/tag --------------------------------------------------------------------------------------

@pytest.mark.parametrize("aggregation", [None, "simple", "first", "none"])
def test_tag_answers_as_the_library_does(tagger, models, aggregation):
    model = models["token-classification"]
    body = {"input": TEXTS, **({"aggregation_strategy": aggregation} if aggregation else {})}
    status, data = tagger.post("/v1/tag", body)
    assert status == 200 and list(data) == ["object", "model", "data", "usage"]
    assert data["usage"] == {"prompt_tokens": _tokens(model, TEXTS), "total_tokens": _tokens(model, TEXTS)}
    expected = model.tag(TEXTS, aggregation=aggregation or "simple")
    for index, (item, entities) in enumerate(zip(data["data"], expected)):
        assert item["index"] == index and len(item["entities"]) == len(entities)
        for got, want in zip(item["entities"], entities):
            assert set(got) == {"text", "label", "start", "end", "score"}
            assert (got["text"], got["label"], got["start"], got["end"]) == (want.text, want.label, want.start, want.end)
            assert got["text"] == TEXTS[index][got["start"]:got["end"]] and got["score"] == pytest.approx(want.score)


def test_tag_takes_one_string_and_refuses_other_strategies(tagger):
    status, data = tagger.post("/v1/tag", {"input": TEXTS[2]})
    assert status == 200 and len(data["data"]) == 1 and data["data"][0]["index"] == 0
    status, data = tagger.post("/v1/tag", {"input": "a", "aggregation_strategy": "max"})
    assert status == 400 and data["error"]["param"] == "aggregation_strategy" and "'simple'" in data["error"]["message"]


# --- --embeddings beside a chat bundle ------------------------------------------------------------

def test_embeddings_beside_a_chat_bundle(combined, tiny_bundle, bundles, models):
    client = _client(combined)
    embed_name = models["feature-extraction"].manifest.name
    assert [m.id for m in client.models.list().data] == [tiny_bundle.name, embed_name]
    reply = client.chat.completions.create(model=tiny_bundle.name, messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=2)
    assert reply.usage.completion_tokens <= 2
    vectors = client.embeddings.create(model=embed_name, input=TEXTS[:2])
    np.testing.assert_allclose([d.embedding for d in vectors.data], models["feature-extraction"].embed(TEXTS[:2]),
                               atol=1e-6)
    with pytest.raises(openai.NotFoundError, match="this endpoint serves"):
        client.embeddings.create(model=tiny_bundle.name, input="hi")
    status, data = combined.post("/v1/classify", {"input": "hi"})
    assert status == 404 and tiny_bundle.name in data["error"]["message"] and embed_name in data["error"]["message"]


def test_a_decoder_only_server_refuses_the_encoder_endpoints(tiny_bundle, tmp_path):
    server = Server(tmp_path / "server.log", str(tiny_bundle))
    try:
        for path in ("/v1/embeddings", "/v1/classify", "/v1/tag"):
            status, data = server.post(path, {"input": "hi"})
            assert status == 404 and data["error"]["code"] == "endpoint_not_served"
            assert "POST /v1/chat/completions, POST /v1/completions" in data["error"]["message"]
    finally:
        server.stop()


def test_embeddings_must_come_from_an_embedding_bundle(tiny_bundle, bundles):
    command = [sys.executable, "-m", "edgelm.cli", "serve", str(tiny_bundle), "--port", str(_free_port()),
               "--embeddings", str(bundles["sequence-classification"])]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "not an embedding model" in result.stderr, result.stderr
