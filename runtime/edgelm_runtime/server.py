"""An OpenAI-compatible local server for one bundle (`edgelm serve`), on starlette + uvicorn.

POST /v1/chat/completions, POST /v1/completions (both with SSE streaming), GET /v1/models,
GET /health. One generation runs at a time (the model is not thread-safe and two would only
share the same cores); up to `queue_limit` more wait, beyond that 429. A streaming client that
disconnects stops its generation at the next token. Bad requests get 400 with an OpenAI-style
error body; bodies over `max_body_bytes` get 413. Binds 127.0.0.1 unless told otherwise.

Optional extra: `pip install 'edgelm-runtime[server]'` (the core runtime does not import this)."""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from edgelm_runtime.errors import EdgelmRuntimeError
from edgelm_runtime.model import LanguageModel

MAX_BODY_BYTES = 1 << 20


class RequestError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def error_response(error: RequestError) -> JSONResponse:
    return JSONResponse({"error": {"message": error.message, "type": error.kind, "param": error.param, "code": None}},
                        status_code=error.status)


class Gate:
    """One generation at a time, at most `queue_limit` waiting. Released by the generation's
    worker finishing (not by the request), so a client that goes away cannot leak the model."""

    def __init__(self, queue_limit: int) -> None:
        self._lock = asyncio.Lock()
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


def _options(body: dict[str, Any], llm: LanguageModel) -> dict[str, Any]:
    """Sampling options from an OpenAI request body, checked by the runtime's own rules."""
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop)):
        raise RequestError(400, "stop must be a non-empty string or a list of them", "stop")
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1):
        raise RequestError(400, "max_tokens must be a whole number >= 1", "max_tokens")
    try:
        sampling = llm.sampling_params(temperature=body.get("temperature"), top_p=body.get("top_p"), seed=body.get("seed"))
    except EdgelmRuntimeError as exc:
        raise RequestError(400, exc.message, exc.message.split(" ")[0]) from None
    return {"sampling": sampling, "max_new_tokens": max_tokens, "stop": stop}


class Generation:
    """Runs one request's token stream in a worker thread; `cancel()` stops it at the next token."""

    def __init__(self, llm: LanguageModel, ids: list[int], options: dict[str, Any]) -> None:
        self.llm, self.ids, self.options = llm, ids, options
        self.cancelled = threading.Event()
        self.pieces: asyncio.Queue[str | None] = asyncio.Queue()
        self.stats = None
        self.error: BaseException | None = None

    def run(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            stream = self.llm.stream_ids(self.ids, self.options["max_new_tokens"], self.options["sampling"],
                                         self.options["stop"])
            for piece in stream:
                if self.cancelled.is_set():
                    stream.close()
                    break
                loop.call_soon_threadsafe(self.pieces.put_nowait, piece)
        except BaseException as exc:  # reported to the request, never kills the server
            self.error = exc
        finally:
            self.stats = self.llm.last_stats
            loop.call_soon_threadsafe(self.pieces.put_nowait, None)


def create_app(llm: LanguageModel, queue_limit: int = 8, max_body_bytes: int = MAX_BODY_BYTES,
               api_key: str | None = None) -> Starlette:
    gate = Gate(queue_limit)
    model_id = llm.manifest.name

    def authorized(request: Request) -> bool:
        """With an API key, every /v1 request needs `Authorization: Bearer KEY` (constant-time check)."""
        if api_key is None:
            return True
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.encode(), api_key.encode())

    async def read_body(request: Request) -> dict[str, Any]:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body_bytes:
            raise RequestError(413, f"request body over {max_body_bytes} bytes")
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > max_body_bytes:
                raise RequestError(413, f"request body over {max_body_bytes} bytes")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise RequestError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise RequestError(400, "the request body must be a JSON object")
        return body

    def prompt_ids(body: dict[str, Any], chat: bool, options: dict[str, Any]) -> list[int]:
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in messages):
                raise RequestError(400, "messages must be a non-empty list of {role, content} strings", "messages")
            try:
                return llm.chat_prompt_ids(messages, options["max_new_tokens"])
            except EdgelmRuntimeError as exc:
                raise RequestError(400, exc.message, "messages") from None
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise RequestError(400, "prompt must be a non-empty string", "prompt")
        return llm.tokenizer.encode(prompt, add_special_tokens=True)

    async def complete(request: Request, chat: bool) -> Response:
        if not authorized(request):
            return error_response(RequestError(401, "missing or wrong API key", kind="authentication_error"))
        try:
            body = await read_body(request)
            options = _options(body, llm)
            ids = prompt_ids(body, chat, options)
            llm.check_request(ids, options["max_new_tokens"], options["stop"])
        except RequestError as exc:
            return error_response(exc)
        except EdgelmRuntimeError as exc:
            return error_response(RequestError(400, exc.message))
        created, rid = int(time.time()), f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        try:
            await gate.acquire()
        except RequestError as exc:
            return error_response(exc)
        generation = Generation(llm, ids, options)
        loop = asyncio.get_running_loop()
        worker = loop.run_in_executor(None, generation.run, loop)
        worker.add_done_callback(lambda _: gate.release())
        if body.get("stream"):
            return StreamingResponse(_sse(generation, worker, chat, rid, created, model_id),
                                     media_type="text/event-stream")
        try:
            pieces = []
            while (piece := await generation.pieces.get()) is not None:
                pieces.append(piece)
            await worker
        finally:
            generation.cancelled.set()  # a non-streaming client that went away stops it too
        if generation.error is not None:
            return error_response(RequestError(500, f"generation failed: {generation.error}", kind="server_error"))
        text = "".join(pieces)
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}} if chat
                  else {"index": 0, "text": text, "logprobs": None})
        choice["finish_reason"] = _finish(generation.stats)
        return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion",
                             "created": created, "model": model_id, "choices": [choice],
                             "usage": _usage(generation.stats, len(ids))})

    async def chat_completions(request: Request) -> Response:
        return await complete(request, chat=True)

    async def completions(request: Request) -> Response:
        return await complete(request, chat=False)

    async def models(request: Request) -> Response:
        if not authorized(request):
            return error_response(RequestError(401, "missing or wrong API key", kind="authentication_error"))
        return JSONResponse({"object": "list", "data": [{"id": model_id, "object": "model", "created": 0,
                                                         "owned_by": "edgelm"}]})

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": model_id})

    return Starlette(routes=[Route("/v1/chat/completions", chat_completions, methods=["POST"]),
                             Route("/v1/completions", completions, methods=["POST"]),
                             Route("/v1/models", models, methods=["GET"]),
                             Route("/health", health, methods=["GET"])])


async def _sse(generation: Generation, worker: Any, chat: bool, rid: str, created: int,
               model_id: str) -> AsyncIterator[str]:
    """Server-sent events; when the client goes away starlette cancels this, which cancels the run."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    def event(delta: str | None, finish: str | None) -> str:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
        if chat:
            choice["delta"] = {} if delta is None else {"content": delta}
        else:
            choice["text"] = delta or ""
        return f"data: {json.dumps({'id': rid, 'object': kind, 'created': created, 'model': model_id, 'choices': [choice]})}\n\n"

    try:
        if chat:
            yield event("", None).replace('"content": ""', '"role": "assistant", "content": ""')
        while (piece := await generation.pieces.get()) is not None:
            yield event(piece, None)
        await worker
        yield event(None, _finish(generation.stats))
        yield "data: [DONE]\n\n"
    finally:
        generation.cancelled.set()  # the client left (or we are done): the worker stops at its next token


def _finish(stats: Any) -> str:
    return "length" if stats is not None and stats.finish_reason in ("max_new_tokens", "max_seq_len") else "stop"


def _usage(stats: Any, prompt_tokens: int) -> dict[str, int]:
    completion = stats.generated_tokens if stats is not None else 0
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def serve(llm: LanguageModel, host: str = "127.0.0.1", port: int = 8000, queue_limit: int = 8,
          api_key: str | None = None) -> None:
    import uvicorn

    uvicorn.run(create_app(llm, queue_limit, api_key=api_key), host=host, port=port, log_level="warning")
