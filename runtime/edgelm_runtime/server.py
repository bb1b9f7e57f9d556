"""An OpenAI-compatible local server for a bundle (`edgelm serve`), on starlette + uvicorn.

A decoder bundle serves POST /v1/chat/completions and /v1/completions (both with SSE streaming),
an encoder bundle its task's endpoint (encoder_server.py: /v1/embeddings, /v1/classify, /v1/tag),
and an embedding bundle may add /v1/embeddings beside another; always GET /v1/models, GET /health.
Any other known endpoint is a 404 naming what this server serves. One model run at a time (two
would only share the same cores), or with `parallel` N up to N generations whose decode steps run
as one batch (batch.py: each step reads the weights once for all of them); up to `queue_limit`
more wait, beyond that 429. A client that disconnects (queued or running) stops its run at the next token or batch.

The event loop only moves bytes: parsing, checking, rendering, tokenizing and trimming a request
run in a small thread pool under a deadline (503 past it), so no request can stall /health or the
others. Bodies: at most `Limits.max_body_bytes` (413), within `body_seconds` (408), at most
`max_uploads` read at once (503). Every error is an OpenAI-style JSON body on one line, without
a path of this machine; bad input is a 4xx, never a 500 (requests.py checks every field). Binds
127.0.0.1 unless told otherwise; an API key, when given, must not be empty.

Optional extra: `pip install 'edgelm-runtime[server]'` (the core runtime does not import this)."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from edgelm_runtime.decoder_server import decoder_handlers
from edgelm_runtime.encoder import EncoderModel
from edgelm_runtime.encoder_server import ENCODER_ENDPOINTS, check_embeddings, encoder_handlers
from edgelm_runtime.errors import GenerationError
from edgelm_runtime.model import LanguageModel
from edgelm_runtime.requests import RequestError, model_ids, prepare_timeout, public

logger = logging.getLogger(__name__)
MAX_BODY_BYTES = 1 << 20
DECODER_ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
T = TypeVar("T")
Handler = Callable[[Request], Awaitable[Response]]
Served = LanguageModel | EncoderModel


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = MAX_BODY_BYTES
    body_seconds: float = 10.0     # the whole body must arrive within this: a stalled upload gets 408
    max_uploads: int = 16          # bodies being read at once; more get 503 (each holds up to max_body_bytes)
    prepare_seconds: float = 10.0  # parse + check + render + tokenize + trim, queueing included; then 503
    prepare_threads: int = 2


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def check_api_key(api_key: str | None) -> None:
    """An empty key would turn authentication off without saying so: refuse it."""
    if api_key is not None and not api_key.strip():
        raise GenerationError("the API key is empty: that would serve without authentication",
                              hint="pass a non-empty --api-key / EDGELM_API_KEY, or leave both unset")


class Gate:
    """`slots` model runs at a time (1, or --parallel N generations batched), at most `queue_limit`
    waiting. Released by the run's worker finishing (not by the request), so a client that goes
    away cannot leak the model."""

    def __init__(self, queue_limit: int, slots: int = 1) -> None:
        self._lock = asyncio.Semaphore(slots)
        self._waiting = 0
        self._limit = queue_limit

    async def acquire(self) -> None:
        if self._lock.locked() and self._waiting >= self._limit:
            raise RequestError(429, f"the server is busy ({self._limit} requests already waiting); retry later",
                               kind="rate_limit_error")
        self._waiting += 1
        try:
            await self._lock.acquire()
        finally:
            self._waiting -= 1

    def release(self) -> None:
        self._lock.release()


class Http:
    """What every endpoint shares: the API key check, bounded body reads, the prepare pool under its
    deadline, the gate, and error bodies without a path of this machine (`folders`: the bundles)."""

    def __init__(self, limits: Limits, api_key: str | None, gate: Gate, folders: Sequence[Path],
                 parallel: int = 1) -> None:
        self.limits, self.gate, self._api_key, self._folders = limits, gate, api_key, tuple(folders)
        self._uploads = 0
        self._preparing = ThreadPoolExecutor(limits.prepare_threads, thread_name_prefix="edgelm-prepare")
        # the model runs: one thread per slot the gate lets through (the default pool may have fewer)
        self.workers = ThreadPoolExecutor(parallel, thread_name_prefix="edgelm-run")

    def authorize(self, request: Request) -> None:
        """With an API key, every /v1 request needs `Authorization: Bearer KEY` (constant-time check)."""
        if self._api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if not (scheme.lower() == "bearer" and hmac.compare_digest(token.encode(), self._api_key.encode())):
            raise RequestError(401, "missing or wrong API key", kind="authentication_error")

    async def read_body(self, request: Request) -> bytes:
        limit = self.limits.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise RequestError(413, f"request body over {limit} bytes")
        if self._uploads >= self.limits.max_uploads:
            raise RequestError(503, f"the server is already reading {self.limits.max_uploads} request bodies; "
                                    "retry later", kind="server_error", code="overloaded")
        self._uploads += 1
        try:
            return await asyncio.wait_for(self._read(request), self.limits.body_seconds)
        except asyncio.TimeoutError:
            raise RequestError(408, f"the request body did not arrive within {self.limits.body_seconds:g} s",
                               code="timeout") from None
        finally:
            self._uploads -= 1

    async def _read(self, request: Request) -> bytes:
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > self.limits.max_body_bytes:
                raise RequestError(413, f"request body over {self.limits.max_body_bytes} bytes")
        return bytes(raw)

    async def wait(self, request: Request, awaitable: Awaitable[T]) -> T:
        """`await awaitable`, unless the client leaves first (ClientGone)."""
        return await until_gone(request, awaitable)

    async def prepare(self, request: Request, work: Callable[[float], T]) -> T:
        """`work(deadline)` in the prepare pool; past the deadline a 503 (the work stops itself at it,
        the wait gives it a moment to say so)."""
        deadline = time.monotonic() + self.limits.prepare_seconds
        job = asyncio.wrap_future(self._preparing.submit(work, deadline))
        try:
            return await until_gone(request, asyncio.wait_for(job, self.limits.prepare_seconds + 0.5))
        except asyncio.TimeoutError:
            raise prepare_timeout() from None

    async def run_gated(self, request: Request, work: Callable[[threading.Event], T]) -> T:
        """`work(cancelled)` in a worker thread once the gate lets it through; `cancelled` is set when
        the client leaves, and the gate opens when the worker ends, not when the request does."""
        await until_gone(request, self.gate.acquire())
        cancelled = threading.Event()
        try:
            worker = asyncio.get_running_loop().run_in_executor(self.workers, work, cancelled)
        except BaseException:
            self.gate.release()
            raise
        worker.add_done_callback(lambda _: self.gate.release())
        try:
            return await until_gone(request, asyncio.shield(worker))
        finally:
            cancelled.set()

    def error_response(self, error: RequestError, headers: dict[str, str] | None = None) -> Response:
        body = error.body()
        body["error"]["message"] = public(body["error"]["message"], *self._folders)
        return Response(json.dumps(body, separators=(",", ":")), status_code=error.status,
                        media_type="application/json", headers=headers)

    def endpoint(self, handler: Handler) -> Handler:
        """Errors become JSON bodies: a RequestError its own, a bug one line in the log and a bare 500."""
        async def run(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestError as exc:
                close = {"Connection": "close"} if exc.status in (408, 413, 503) else None  # body maybe unread
                return self.error_response(exc, close)
            except ClientGone:
                return Response(status_code=499)
            except ClientDisconnect:
                logger.warning("%s: the client left during its upload", _peer(request))
                return Response(status_code=499)
            except BaseException as exc:
                if not isinstance(exc, Exception) and type(exc).__name__ != "PanicException":  # a Rust panic
                    raise  # cancellation, Ctrl-C, exit
                logger.error("%s %s failed: %s: %s", request.method, request.url.path, type(exc).__name__,
                             " ".join(str(exc).split())[:300], exc_info=logger.isEnabledFor(logging.DEBUG))
                return self.error_response(RequestError(500, "internal server error", kind="server_error"))
        return run

    async def http_error(self, request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        message = exc.detail if isinstance(exc, HTTPException) else "internal server error"
        return self.error_response(RequestError(status, str(message), kind="invalid_request_error" if status < 500
                                                else "server_error"))


def endpoints(model: Served) -> tuple[str, ...]:
    """The POST endpoints a bundle serves, by its task."""
    task = model.manifest.task
    return DECODER_ENDPOINTS if task == "text-generation" else (ENCODER_ENDPOINTS[task],)


def create_app(model: Served, queue_limit: int = 8, max_body_bytes: int = MAX_BODY_BYTES,
               api_key: str | None = None, limits: Limits | None = None,
               embeddings: EncoderModel | None = None, parallel: int = 1) -> Starlette:
    """The app for `model` (a decoder or an encoder bundle) and, with `embeddings`, /v1/embeddings
    from that feature-extraction bundle beside it. Both share one gate: they share the cores.
    `parallel` > 1: that many generations run at once, their decode steps batched."""
    check_api_key(api_key)
    models = [model] if embeddings is None else [model, check_embeddings(model, embeddings)]
    limits = limits or Limits(max_body_bytes=max_body_bytes)
    if parallel > 1 and model.manifest.task == "text-generation":
        model.enable_batching(parallel)
    http = Http(limits, api_key, Gate(queue_limit, parallel), [m.path for m in models], parallel)
    handlers: dict[str, Handler] = {}
    for served in models:
        handlers |= (decoder_handlers(served, http) if served.manifest.task == "text-generation"
                     else encoder_handlers(served, http))
    summary = "; ".join(f"{m.manifest.name!r} ({m.manifest.task}): " + ", ".join(f"POST {e}" for e in endpoints(m))
                        for m in models)

    def not_served(path: str) -> Handler:
        async def answer(request: Request) -> Response:
            http.authorize(request)
            raise RequestError(404, f"POST {path} is not served here; this server serves {summary}",
                               code="endpoint_not_served")
        return answer

    async def model_list(request: Request) -> Response:
        http.authorize(request)
        return JSONResponse({"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "edgelm"}
                                                        for m in models for name in model_ids(m)]})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": models[0].manifest.name})

    known = (*DECODER_ENDPOINTS, *ENCODER_ENDPOINTS.values())
    routes = [Route(path, http.endpoint(handlers.get(path) or not_served(path)), methods=["POST"]) for path in known]
    return Starlette(routes=[*routes, Route("/v1/models", http.endpoint(model_list), methods=["GET"]),
                             Route("/health", health, methods=["GET"])],
                     exception_handlers={HTTPException: http.http_error, Exception: http.http_error})


async def until_gone(request: Request, awaitable: Awaitable[T]) -> T:
    """`await awaitable`, unless the client disconnects first: then it is cancelled and ClientGone raised."""
    task = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task in done:
        return task.result()
    raise ClientGone


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone (the body is read: the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        await asyncio.sleep(0.05)


def _peer(request: Request) -> str:
    return f"{request.client.host}:{request.client.port}" if request.client else "a client"


def serve(model: Served, host: str = "127.0.0.1", port: int = 8000, queue_limit: int = 8,
          api_key: str | None = None, limits: Limits | None = None, embeddings: EncoderModel | None = None,
          parallel: int = 1) -> None:
    if api_key is None and os.environ.get("EDGELM_API_KEY") == "":  # set but empty: click reads it as unset
        check_api_key("")
    # refuses an empty key (or bundles that cannot be served together) before binding
    app = create_app(model, queue_limit, api_key=api_key, limits=limits, embeddings=embeddings, parallel=parallel)
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="warning")
