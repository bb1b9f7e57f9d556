"""Request bodies of `edgelm serve`, checked field by field before any work is done.

The chat and completion bodies are checked here; the field, model and text checks are shared with
the encoder endpoints (encoder_server.py).

`prepare` runs in a worker thread: parsing, rendering, tokenizing and trimming are CPU work that
must not stall the event loop. Every field's type is checked (nothing is coerced: `"stream": "no"`
is a 400, not a stream) and every refusal names its field in an OpenAI-style error body, one line,
with no path of the server's machine in it. Fields the server cannot honour (n > 1, logprobs,
penalties, tools) are refused, not ignored; their off values are accepted.
Limits: MAX_MESSAGES messages, generate.MAX_STOP_STRINGS stop strings of MAX_STOP_CHARS each."""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgelm_runtime.errors import EdgelmRuntimeError
from edgelm_runtime.generate import MAX_STOP_CHARS, MAX_STOP_STRINGS
from edgelm_runtime.history import PromptDeadlineError
from edgelm_runtime.model import LanguageModel
from edgelm_runtime.sampling import SamplingParams

MAX_MESSAGES = 4096  # per request; far past any edge context, and each one costs a render
MAX_SEED = 2**64


class RequestError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": " ".join(self.message.split()) or "error", "type": self.kind,
                          "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Prepared:
    """A checked request: the prompt's token ids and what to generate."""

    ids: list[int]
    max_new_tokens: int | None
    sampling: SamplingParams
    stop: list[str] | None
    stream: bool
    include_usage: bool


def _off(allowed: str, test: Any) -> tuple[str, Any]:
    return allowed, lambda v: v is None or test(v)


def _int_is(value: Any, number: int) -> bool:
    return type(value) is int and value == number


_COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "stop", "stream",
           "stream_options"}
_OFF = {  # accepted only at the value that asks for nothing: honouring none of them, the server says so
    "n": _off("1", lambda v: _int_is(v, 1)),
    "presence_penalty": _off("0", lambda v: type(v) in (int, float) and v == 0),
    "frequency_penalty": _off("0", lambda v: type(v) in (int, float) and v == 0),
    "logit_bias": _off("{}", lambda v: v == {}),
    "logprobs": _off("false", lambda v: v is False or _int_is(v, 0)),
    "top_logprobs": _off("0", lambda v: _int_is(v, 0)),
    "user": _off("a string", lambda v: isinstance(v, str) and valid_unicode(v)),
    "response_format": _off('{"type": "text"}', lambda v: v == {"type": "text"}),
    "tools": _off("[]", lambda v: v == []),
    "tool_choice": _off('"none" or "auto"', lambda v: v in ("none", "auto")),
    "parallel_tool_calls": _off("true or false", lambda v: isinstance(v, bool)),
    "echo": _off("false", lambda v: v is False),
    "best_of": _off("1", lambda v: _int_is(v, 1)),
    "suffix": _off('""', lambda v: v == ""),
}
CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "n", "presence_penalty", "frequency_penalty",
                         "logit_bias", "logprobs", "top_logprobs", "user", "response_format", "tools", "tool_choice",
                         "parallel_tool_calls"}
COMPLETION_FIELDS = _COMMON | {"prompt", "n", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs",
                               "user", "echo", "best_of", "suffix"}
_MESSAGE_FIELDS = {"role", "content", "name"}


def bad(message: str, param: str | None = None) -> RequestError:
    return RequestError(400, message, param)


def prepare(raw: bytes, chat: bool, llm: LanguageModel, deadline: float | None = None) -> Prepared:
    """Parse and check a request body, then render, tokenize and trim its prompt (RequestError if bad)."""
    body = parse_body(raw)
    check_fields(body, CHAT_FIELDS if chat else COMPLETION_FIELDS)
    check_model(body, llm.manifest.name)
    stream = _flag(body.get("stream"), "stream")
    include_usage = _stream_options(body.get("stream_options"), stream)
    max_tokens = _max_tokens(body)
    stop = _stop(body.get("stop"))
    sampling = _sampling(body, llm)
    if chat:
        messages = _messages(body.get("messages"))
        try:
            ids = llm.chat_prompt_ids(messages, max_tokens, deadline=deadline)
        except PromptDeadlineError:
            raise prepare_timeout() from None
        except EdgelmRuntimeError as exc:
            raise bad(public(exc.message, llm.path), "messages") from None
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise bad("prompt must be a non-empty string (lists of prompts or of token ids are not supported)", "prompt")
        check_unicode(prompt, "prompt")
    try:
        if not chat:
            ids = llm.tokenizer.encode(prompt, add_special_tokens=True)
        llm.check_request(ids, max_tokens, stop)
    except EdgelmRuntimeError as exc:
        raise bad(public(exc.message, llm.path), "messages" if chat else "prompt") from None
    return Prepared(ids, max_tokens, sampling, stop, stream, include_usage)


def check_fields(body: dict[str, Any], allowed: set[str]) -> None:
    """Unknown fields are a 400, and so are fields this server cannot honour unless at their off value."""
    for name, value in body.items():
        if name not in allowed:
            raise bad(f"unknown field {show(name)} (this server does not support it)", _param(name))
        if name in _OFF and not _OFF[name][1](value):
            raise bad(f"{name} is not supported here: send {_OFF[name][0]} or leave it out", name)


def check_model(body: dict[str, Any], served: str) -> None:
    """`model` may be left out; any other name than the served bundle's is a 404."""
    model = body.get("model")
    if model is not None:
        check_text(model, "model")
        if model != served:
            raise RequestError(404, f"model {show(model)} is not served here; this endpoint serves {served!r}",
                               "model", code="model_not_found")


def prepare_timeout() -> RequestError:
    return RequestError(503, "preparing the prompt took too long; send a shorter conversation or retry later",
                        kind="server_error", code="timeout")


def parse_body(raw: bytes) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise bad("the request body is not valid UTF-8") from None
    try:
        body = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise bad("the request body is nested too deeply") from None
    except ValueError:  # also NaN / Infinity, and integers over Python's digit limit
        raise bad("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    return body


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _messages(messages: Any) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list of {role, content} objects", "messages")
    if len(messages) > MAX_MESSAGES:
        raise bad(f"messages has {len(messages)} entries; at most {MAX_MESSAGES} are allowed per request", "messages")
    clean = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise bad(f"{where} must be an object with a role and a content", where)
        for key, value in message.items():
            if key not in _MESSAGE_FIELDS and value not in (None, [], {}):
                raise bad(f"{where}.{show(key)} is not supported here", _param(f"{where}.{key}"))
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            raise bad(f"{where}.role must be a non-empty string", f"{where}.role")
        if not isinstance(content, str):
            raise bad(f"{where}.content must be a string (content parts are not supported)", f"{where}.content")
        check_unicode(role, f"{where}.role")
        check_unicode(content, f"{where}.content")
        kept = {"role": role, "content": content}
        if message.get("name") is not None:
            kept["name"] = check_text(message["name"], f"{where}.name")
        clean.append(kept)
    return clean


def _max_tokens(body: dict[str, Any]) -> int | None:
    values = {name: body.get(name) for name in ("max_tokens", "max_completion_tokens") if body.get(name) is not None}
    for name, value in values.items():
        if not is_whole(value) or value < 1:
            raise bad(f"{name} must be a whole number >= 1", name)
    if len(set(values.values())) > 1:
        raise bad("max_tokens and max_completion_tokens differ; send one of them", "max_tokens")
    return next(iter(values.values()), None)


def _stop(stop: Any) -> list[str] | None:
    if stop is None:
        return None
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad("stop must be a non-empty string or a list of them", "stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise bad(f"stop has {len(stops)} strings; at most {MAX_STOP_STRINGS} are allowed", "stop")
    for text in stops:
        if len(text) > MAX_STOP_CHARS:
            raise bad(f"a stop string is {len(text)} characters long; at most {MAX_STOP_CHARS} are allowed", "stop")
        check_unicode(text, "stop")
    return stops or None


def _sampling(body: dict[str, Any], llm: LanguageModel) -> SamplingParams:
    numbers = {}
    for name, allowed, ok in (("temperature", ">= 0", lambda v: v >= 0), ("top_p", "in (0, 1]", lambda v: 0 < v <= 1),
                              ("repetition_penalty", "> 0", lambda v: v > 0)):
        value = body.get(name)
        if value is not None and not (_real(value) and ok(value)):
            raise bad(f"{name} must be a number {allowed}", name)
        numbers[name] = value
    for name, top in (("top_k", None), ("seed", MAX_SEED)):
        value = body.get(name)
        if value is not None and not (is_whole(value) and value >= 0 and (top is None or value < top)):
            raise bad(f"{name} must be a whole number >= 0" + (" and < 2**64" if top else ""), name)
        numbers[name] = value
    try:
        return llm.sampling_params(**numbers)
    except EdgelmRuntimeError as exc:
        raise bad(exc.message, exc.message.split(" ")[0]) from None


def _stream_options(options: Any, stream: bool) -> bool:
    if options is None:
        return False
    if not stream:
        raise bad("stream_options is only allowed with stream: true", "stream_options")
    if not isinstance(options, dict) or set(options) - {"include_usage"} \
            or not isinstance(options.get("include_usage", False), bool):
        raise bad('stream_options must be {"include_usage": true or false}', "stream_options")
    return bool(options.get("include_usage"))


def _flag(value: Any, name: str) -> bool:
    if value is not None and not isinstance(value, bool):
        raise bad(f"{name} must be true or false", name)
    return bool(value)


def check_text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise bad(f"{name} must be a string", name)
    check_unicode(value, name)
    return value


def is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def valid_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_unicode(text: str, name: str) -> None:
    """JSON may carry lone surrogates ("\\ud800"), which no tokenizer (or UTF-8) can take."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise bad(f"{name} is not valid Unicode (a lone surrogate at character {exc.start})", name) from None


def show(value: Any) -> str:
    text = ascii(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _param(name: str) -> str:
    return ascii(name)[1:-1][:64]


# a path of this machine, not one of the server's own endpoints (/v1/embeddings)
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/])(?:[A-Za-z]:\\|/(?!v1/))(?:[^\s/\\'\"():,]+[/\\])*[^\s/\\'\"():,]+")


def public(message: str, *folders: Path) -> str:
    """A message fit for a client: the bundle folders' own paths made relative, any other path cut."""
    for folder in folders:
        for prefix in sorted({str(folder.resolve()), os.path.abspath(folder), str(folder)}, key=len, reverse=True):
            message = message.replace(prefix + os.sep, "").replace(prefix, folder.name)
    return _ABSOLUTE_PATH.sub("<path>", message)
