"""The decoder endpoints of `edgelm serve`: POST /v1/chat/completions and /v1/completions.

A request's `n` choices run one after another in a worker thread (with `--parallel N`, up to N
requests at once, their decode steps batched: batch.py), each with its own matcher when the reply is constrained (response_format, or a
forced tool_choice) and, when the request has a seed, seed + its index. The reply is parsed for
tool calls when the request declared tools (tool_calls.py): `finish_reason: "tool_calls"` and
`message.tool_calls`, or in a stream the content up to the call, then one tool-call delta per
call with its whole arguments (the OpenAI clients accumulate deltas either way). Logprobs are the
model's log-softmax at each generated token, after the grammar's mask, before temperature."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from edgelm_runtime.model import LanguageModel
from edgelm_runtime.request_checks import RequestError
from edgelm_runtime.requests import Prepared, prepare
from edgelm_runtime.scoring import log_softmax
from edgelm_runtime.tool_calls import CLOSE, CallDetector, ToolCall, parse_tool_calls, repeats_a_call

if TYPE_CHECKING:
    from edgelm_runtime.server import Http

logger = logging.getLogger(__name__)
Piece = tuple[int, "str | None", list[dict[str, Any]]]  # (choice, text or None at its end, logprob entries)


class Logprobs:
    """Collects each generated token's logprob entry (OpenAI's chat shape) from the decode loop."""

    def __init__(self, llm: LanguageModel, top: int) -> None:
        self._llm, self._top = llm, top
        self._eos = frozenset(llm.manifest.eos_token_ids)
        self._entries: list[dict[str, Any]] = []

    def observe(self, logits: np.ndarray, token: int) -> None:
        if token in self._eos:
            return
        logprobs = log_softmax(logits)
        entry = self._entry(token, float(logprobs[token]))
        if self._top:
            best = np.argpartition(-logprobs, self._top)[:self._top]
            best = best[np.argsort(-logprobs[best], kind="stable")]
            entry["top_logprobs"] = [self._entry(int(t), float(logprobs[t])) for t in best]
        else:
            entry["top_logprobs"] = []
        self._entries.append(entry)

    def _entry(self, token: int, logprob: float) -> dict[str, Any]:
        text = self._llm.tokenizer.decode([token], skip_special_tokens=False)
        return {"token": text, "logprob": max(logprob, -9999.0), "bytes": list(text.encode("utf-8"))}

    def take(self) -> list[dict[str, Any]]:
        entries, self._entries = self._entries, []
        return entries


class Generation:
    """Runs one request's choices in a worker thread; `cancelled` stops it at the next token."""

    def __init__(self, llm: LanguageModel, prepared: Prepared) -> None:
        self.llm, self.prepared = llm, prepared
        self.cancelled = threading.Event()
        self.pieces: asyncio.Queue[Piece | None] = asyncio.Queue()
        self.stats: list[Any] = []
        self.error: BaseException | None = None

    def run(self, loop: asyncio.AbstractEventLoop) -> None:
        p = self.prepared
        put = lambda item: loop.call_soon_threadsafe(self.pieces.put_nowait, item)  # noqa: E731
        try:
            for index in range(p.n):
                if self.cancelled.is_set():
                    break
                sampling = p.sampling if p.sampling.seed is None else replace(p.sampling, seed=p.sampling.seed + index)
                recorder = None if p.top_logprobs is None else Logprobs(self.llm, p.top_logprobs)
                stats: list[Any] = []  # this choice's own stats: concurrent requests share the model
                stream = self.llm.stream_ids(p.ids, p.max_new_tokens, sampling, p.stop, p.constraint(),
                                             recorder.observe if recorder else None, stats.append)
                text = ""
                for piece in stream:
                    if self.cancelled.is_set():
                        stream.close()
                        break
                    put((index, piece, recorder.take() if recorder else []))
                    if p.tools is None:
                        continue
                    text += piece
                    if CLOSE in text[-len(piece) - len(CLOSE):] and repeats_a_call(text):
                        stream.close()  # the model loops on a call it already made: the reply ends here
                        break
                self.stats.append(stats[0] if stats else None)
                put((index, None, recorder.take() if recorder else []))
        except BaseException as exc:  # reported to the request, never kills the server
            self.error = exc
            logger.error("generation failed: %s: %s", type(exc).__name__, " ".join(str(exc).split())[:300])
        finally:
            put(None)


def decoder_handlers(llm: LanguageModel, http: Http) -> dict[str, Callable[[Request], Awaitable[Response]]]:
    model_id = llm.manifest.name

    async def complete(request: Request, chat: bool) -> Response:
        http.authorize(request)
        raw = await http.read_body(request)
        prepared = await http.prepare(request, lambda deadline: prepare(raw, chat, llm, deadline))
        chosen = prepared.llm or llm
        meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
                "model": model_id if chosen.adapter is None else f"{model_id}:{chosen.adapter}"}
        await http.wait(request, http.gate.acquire())
        generation = Generation(chosen, prepared)
        loop = asyncio.get_running_loop()
        worker = loop.run_in_executor(http.workers, generation.run, loop)
        worker.add_done_callback(lambda _: http.gate.release())
        if prepared.stream:
            return StreamingResponse(_sse(generation, worker, chat, meta), media_type="text/event-stream")
        try:
            texts, logprobs = await http.wait(request, _collect(generation, worker))
        finally:
            generation.cancelled.set()  # a non-streaming client that went away stops it too
        if generation.error is not None:
            raise RequestError(500, "generation failed (the server log says why)", kind="server_error")
        choices = [_choice(prepared, chat, i, texts[i], logprobs[i], generation.stats[i]) for i in range(len(texts))]
        return JSONResponse({**meta, "object": "chat.completion" if chat else "text_completion", "choices": choices,
                             "usage": _usage(generation.stats, len(prepared.ids))})

    async def chat_completions(request: Request) -> Response:
        return await complete(request, chat=True)

    async def completions(request: Request) -> Response:
        return await complete(request, chat=False)

    return {"/v1/chat/completions": chat_completions, "/v1/completions": completions}


async def _collect(generation: Generation, worker: Awaitable[None]) -> tuple[list[str], list[list[dict[str, Any]]]]:
    texts: list[str] = []
    logprobs: list[list[dict[str, Any]]] = []
    while (item := await generation.pieces.get()) is not None:
        index, piece, entries = item
        while len(texts) <= index:
            texts.append("")
            logprobs.append([])
        texts[index] += piece or ""
        logprobs[index] += entries
    await worker
    return texts, logprobs


def _calls(prepared: Prepared, text: str) -> tuple[str | None, list[ToolCall]]:
    """The reply's content and tool calls (none unless the request declared tools). The same call
    twice in one reply (a small model repeating itself) is kept once."""
    if prepared.tools is None:
        return text, []
    content, calls = parse_tool_calls(text, prepared.tools.tools, prepared.tool_syntax)
    unique: dict[tuple[str, str], ToolCall] = {}
    for call in calls:
        unique.setdefault((call.name, call.arguments), call)
    if prepared.tools.mode == "forced":  # the grammar allowed only calls: the rest is a block cut by max_tokens
        content = None
    return content, list(unique.values())


def _tool_finish(calls: list[ToolCall], stats: Any) -> str:
    """"length" when the reply was cut (its last call may be missing), else "tool_calls" if it called."""
    finish = _finish(stats)
    return "tool_calls" if calls and finish != "length" else finish


def _choice(prepared: Prepared, chat: bool, index: int, text: str, logprobs: list[dict[str, Any]],
            stats: Any) -> dict[str, Any]:
    wanted = prepared.top_logprobs is not None
    if not chat:
        return {"index": index, "text": text, "logprobs": _completion_logprobs(logprobs) if wanted else None,
                "finish_reason": _finish(stats)}
    content, calls = _calls(prepared, text)
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = [call.to_openai() for call in calls]
    return {"index": index, "message": message, "logprobs": {"content": logprobs} if wanted else None,
            "finish_reason": _tool_finish(calls, stats)}


def _completion_logprobs(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """The legacy completions shape: parallel lists, top alternatives as {token: logprob}."""
    offsets, at = [], 0
    for entry in entries:
        offsets.append(at)
        at += len(entry["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
            "text_offset": offsets}


async def _sse(generation: Generation, worker: Any, chat: bool, meta: dict[str, Any]) -> AsyncIterator[str]:
    """Server-sent events; when the client goes away starlette cancels this, which cancels the run."""
    prepared = generation.prepared
    kind = "chat.completion.chunk" if chat else "text_completion"
    wanted = prepared.top_logprobs is not None

    def event(index: int, delta: dict[str, Any] | str | None, finish: str | None,
              logprobs: list[dict[str, Any]] | None = None) -> str:
        choice: dict[str, Any] = {"index": index, "finish_reason": finish}
        if chat:
            choice["delta"] = delta or {}
            choice["logprobs"] = {"content": logprobs} if wanted and logprobs else None
        else:
            choice["text"] = delta or ""
            choice["logprobs"] = _completion_logprobs(logprobs) if wanted and logprobs else None
        return _data({**meta, "object": kind, "choices": [choice]})

    detectors: dict[int, CallDetector] = {}
    try:
        while (item := await generation.pieces.get()) is not None:
            index, piece, entries = item
            if chat and index not in detectors:
                detectors[index] = CallDetector(prepared.tool_syntax)
                yield event(index, {"role": "assistant", "content": ""}, None)
            if piece is not None:
                text = piece if not chat or prepared.tools is None else detectors[index].push(piece)
                if text or entries:
                    yield event(index, {"content": text} if chat else text, None, entries)
            else:
                yield "".join(_end_of_choice(event, prepared, chat, index, detectors.get(index), entries,
                                             generation.stats[index] if index < len(generation.stats) else None))
            # let the loop see a hang-up before the next write: writes to a lost socket log a line each
            await asyncio.sleep(0)
        await worker
        if generation.error is not None:
            yield _data(RequestError(500, "generation failed (the server log says why)", kind="server_error").body())
            return
        if prepared.include_usage:
            yield _data({**meta, "object": kind, "choices": [], "usage": _usage(generation.stats, len(prepared.ids))})
        yield "data: [DONE]\n\n"
    finally:
        generation.cancelled.set()  # the client left (or we are done): the worker stops at its next token


def _end_of_choice(event: Callable[..., str], prepared: Prepared, chat: bool, index: int,
                   detector: CallDetector | None, entries: list[dict[str, Any]], stats: Any) -> list[str]:
    """The last events of one choice: held-back content or its tool calls, then its finish reason."""
    out = []
    if not chat or prepared.tools is None or detector is None:
        if entries:
            out.append(event(index, {"content": ""} if chat else "", None, entries))
        return [*out, event(index, None, _finish(stats))]
    content, calls = _calls(prepared, detector.text)
    if not calls:  # no call after all: what was held back is content
        rest = detector.flush() if not detector.in_call else detector.text[detector.emitted:]
        if rest or entries:
            out.append(event(index, {"content": rest}, None, entries))
        return [*out, event(index, None, _finish(stats))]
    tail = detector.flush()
    if tail:
        out.append(event(index, {"content": tail}, None))
    for position, call in enumerate(calls):
        out.append(event(index, {"tool_calls": [call.to_openai(position)]}, None, entries if position == 0 else None))
    return [*out, event(index, None, _tool_finish(calls, stats))]


def _data(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _finish(stats: Any) -> str:
    return "length" if stats is not None and stats.finish_reason in ("max_new_tokens", "max_seq_len") else "stop"


def _usage(stats: list[Any], prompt_tokens: int) -> dict[str, Any]:
    """OpenAI's usage; `cached_tokens`: prompt tokens of the first choice whose KV was reused."""
    completion = sum(s.generated_tokens for s in stats if s is not None)
    cached = stats[0].cached_tokens if stats and stats[0] is not None else 0
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}
