"""The encoder endpoints of `edgelm serve`: POST /v1/embeddings (OpenAI's), /v1/classify and /v1/tag.

A body is checked like a chat one (requests.py: every field typed, unknown fields a 400, nothing
coerced) in the prepare pool; the model then runs behind the server's gate in a worker thread,
BATCH inputs at a time, and stops at the next batch when the client leaves. Inputs longer than the
bundle's max_length are truncated, as the library does. The response is serialized in the worker
too: 2,048 embeddings of 384 floats are ~15 MB of JSON, ~0.5 s the event loop must not spend."""

from __future__ import annotations

import base64
import json
import logging
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from starlette.requests import Request
from starlette.responses import Response

from edgelm_runtime.encoder import EncoderModel
from edgelm_runtime.errors import EdgelmRuntimeError, GenerationError
from edgelm_runtime.model import LanguageModel
from edgelm_runtime.requests import bad, check_fields, check_model, check_unicode, is_whole, parse_body, public

if TYPE_CHECKING:
    from edgelm_runtime.server import Http

ENCODER_ENDPOINTS = {"feature-extraction": "/v1/embeddings", "sequence-classification": "/v1/classify",
                     "token-classification": "/v1/tag"}
MAX_INPUTS = 2048  # per request, as OpenAI's embeddings endpoint; the 1 MiB body bounds their length
BATCH = 32         # inputs per model run: a client that leaves stops the work at the next one
AGGREGATIONS = ("simple", "first", "none")
_QUIET = threading.local()  # set in a thread running encode(): its truncation warnings are not logged
_FIELDS = {"feature-extraction": {"input", "model", "encoding_format", "dimensions", "user"},
           "sequence-classification": {"input", "model"},
           "token-classification": {"input", "model", "aggregation_strategy"}}


class _Unlogged(logging.Filter):
    """The library warns once per call that truncates; a server would log a line per batch of each
    request (64 for 2,048 long inputs), so the server's own calls are quiet (docs/serving.md says so)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(_QUIET, "on", False)


_UNLOGGED = _Unlogged()


@dataclass(frozen=True)
class EncoderRequest:
    """A checked encoder request: its texts and how to answer."""

    texts: list[str]
    base64: bool = False        # embeddings: little-endian float32 bytes, base64 (OpenAI's client asks for it)
    aggregation: str = "simple"  # tag: how word pieces become entities


def check_embeddings(model: LanguageModel | EncoderModel, embeddings: EncoderModel) -> EncoderModel:
    """`embeddings` may serve /v1/embeddings beside `model` (a decoder or another task's encoder)."""
    if embeddings.manifest.task != "feature-extraction":
        raise GenerationError(f"the embeddings bundle {embeddings.manifest.name!r} is a {embeddings.manifest.task} "
                              "bundle, not an embedding model", hint="pass a feature-extraction bundle")
    if model.manifest.task == "feature-extraction":
        raise GenerationError(f"{model.manifest.name!r} serves /v1/embeddings already",
                              hint="serve one embedding bundle, or the other one on its own port")
    if model.manifest.name == embeddings.manifest.name:
        raise GenerationError(f"both bundles are named {model.manifest.name!r}: /v1/models could not tell them apart",
                              hint="rebuild one of them with another --name")
    return embeddings


def parse_request(raw: bytes, encoder: EncoderModel) -> EncoderRequest:
    """Parse and check a body for `encoder`'s endpoint (RequestError if bad)."""
    body = parse_body(raw)
    check_fields(body, _FIELDS[encoder.task])
    check_model(body, encoder.manifest.name)
    texts = _inputs(body.get("input"))
    if encoder.task == "feature-extraction":
        encoding = body.get("encoding_format")
        if encoding is not None and encoding not in ("float", "base64"):
            raise bad('encoding_format must be "float" or "base64"', "encoding_format")
        dimensions = body.get("dimensions")
        if dimensions is not None and not (is_whole(dimensions) and dimensions == encoder.dim):
            raise bad(f"dimensions must be {encoder.dim}, this model's size (it cannot shorten its embeddings), "
                      "or left out", "dimensions")
        return EncoderRequest(texts, base64=encoding == "base64")
    if encoder.task == "token-classification":
        aggregation = body.get("aggregation_strategy")
        if aggregation is not None and aggregation not in AGGREGATIONS:
            raise bad(f"aggregation_strategy must be one of {', '.join(map(repr, AGGREGATIONS))}",
                      "aggregation_strategy")
        return EncoderRequest(texts, aggregation=aggregation or "simple")
    return EncoderRequest(texts)


def _inputs(value: Any) -> list[str]:
    single = isinstance(value, str)
    if single:
        value = [value]
    elif not isinstance(value, list) or not value:
        raise bad("input must be a non-empty string or a non-empty list of them", "input")
    if all(is_whole(item) or isinstance(item, list) for item in value):
        raise bad("input as token ids is not supported here: send text", "input")
    if len(value) > MAX_INPUTS:
        raise bad(f"input has {len(value)} entries; at most {MAX_INPUTS} are allowed per request", "input")
    for index, text in enumerate(value):
        where = "input" if single else f"input[{index}]"
        if not isinstance(text, str) or not text:
            raise bad(f"{where} must be a non-empty string", where)
        check_unicode(text, where)
    return value


def encode(encoder: EncoderModel, request: EncoderRequest, cancelled: threading.Event) -> bytes | None:
    """The response body, BATCH inputs at a time; None once `cancelled` (the client left)."""
    data: list[dict[str, Any]] = []
    tokens = 0
    _QUIET.on = True
    try:
        for start in range(0, len(request.texts), BATCH):
            if cancelled.is_set():
                return None
            texts = request.texts[start:start + BATCH]
            tokens += _token_count(encoder, texts)
            data += _run(encoder, request, texts, start)
    except EdgelmRuntimeError as exc:
        raise bad(public(exc.message, encoder.path), "input") from None
    finally:
        _QUIET.on = False
    return json.dumps({"object": "list", "model": encoder.manifest.name, "data": data,
                       "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}, separators=(",", ":")).encode()


def _run(encoder: EncoderModel, request: EncoderRequest, texts: list[str], start: int) -> list[dict[str, Any]]:
    if encoder.task == "feature-extraction":
        vectors = np.asarray(encoder.embed(texts, batch_size=BATCH), dtype="<f4")
        return [{"object": "embedding", "index": start + i,
                 "embedding": base64.b64encode(v.tobytes()).decode("ascii") if request.base64 else v.tolist()}
                for i, v in enumerate(vectors)]
    if encoder.task == "sequence-classification":
        return [{"index": start + i, "label": c.label, "score": float(c.scores[c.label]),
                 "scores": {label: float(p) for label, p in c.scores.items()}}
                for i, c in enumerate(encoder.classify(texts, batch_size=BATCH))]
    tagged = encoder.tag(texts, aggregation=request.aggregation, batch_size=BATCH)
    return [{"index": start + i, "entities": [{"text": e.text, "label": e.label, "start": int(e.start),
                                               "end": int(e.end), "score": float(e.score)} for e in entities]}
            for i, entities in enumerate(tagged)]


def _token_count(encoder: EncoderModel, texts: list[str]) -> int:
    """Tokens the model reads, special ones included, after truncation (usage.prompt_tokens)."""
    layout = encoder.manifest.encoder
    encoded = encoder.tokenizer.encode_batch(texts, max_length=layout.static_seq_len or layout.max_length)
    return sum(len(e.ids) for e in encoded)


def encoder_handlers(encoder: EncoderModel, http: Http) -> dict[str, Callable[[Request], Awaitable[Response]]]:
    """{path: handler} for `encoder`'s task."""
    library = logging.getLogger(EncoderModel.__module__)
    if _UNLOGGED not in library.filters:
        library.addFilter(_UNLOGGED)

    async def answer(request: Request) -> Response:
        http.authorize(request)
        raw = await http.read_body(request)
        checked = await http.prepare(request, lambda deadline: parse_request(raw, encoder))
        body = await http.run_gated(request, lambda cancelled: encode(encoder, checked, cancelled))
        if body is None:  # the client left; the server answers no one
            return Response(status_code=499)
        return Response(body, media_type="application/json")

    return {ENCODER_ENDPOINTS[encoder.task]: answer}
