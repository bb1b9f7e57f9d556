"""Request bodies of `edgelm serve`, checked field by field before any work is done.

The chat and completion bodies are checked here (the chat-only fields in chat_fields.py); the
field, model and text checks are shared with the encoder endpoints (encoder_server.py).

`prepare` runs in a worker thread: parsing, rendering, tokenizing, trimming and compiling a
schema or tool grammar are CPU work that must not stall the event loop. Every field's type is
checked (nothing is coerced: `"stream": "no"` is a 400, not a stream) and every refusal names its
field in an OpenAI-style error body, one line, with no path of the server's machine in it. The
few fields the server cannot honour (logit_bias, echo, best_of, suffix) are refused, not ignored;
their off values are accepted. Limits: chat_fields.MAX_MESSAGES messages, MAX_CHOICES choices,
generate.MAX_STOP_STRINGS stop strings of MAX_STOP_CHARS each, MAX_TOP_LOGPROBS alternatives."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edgelm_runtime import chat_fields
from edgelm_runtime.chat_fields import ToolRequest
from edgelm_runtime.constrained import TokenConstraint
from edgelm_runtime.errors import EdgelmRuntimeError
from edgelm_runtime.generate import MAX_STOP_CHARS, MAX_STOP_STRINGS
from edgelm_runtime.history import PromptDeadlineError
from edgelm_runtime.model import LanguageModel
from edgelm_runtime.request_checks import (
    RequestError,
    bad,
    check_text,
    check_unicode,
    is_real,
    is_whole,
    param,
    parse_body,
    public,
    show,
    valid_unicode,
)
from edgelm_runtime.sampling import SamplingParams
from edgelm_runtime.tool_calls import Syntax, call_grammar, history_for_template, template_syntax, with_tool_prompt

MAX_SEED = 2**64
MAX_CHOICES = 16        # n: each choice is a whole generation, run one after another
MAX_TOP_LOGPROBS = 20   # OpenAI's limit for chat (5 for completions)


@dataclass(frozen=True)
class Prepared:
    """A checked request: the prompt's token ids and what to generate. `constraint()` gives each
    choice a fresh matcher (None: unconstrained); `top_logprobs` None means no logprobs."""

    ids: list[int]
    max_new_tokens: int | None
    sampling: SamplingParams
    stop: list[str] | None
    stream: bool
    include_usage: bool
    n: int = 1
    top_logprobs: int | None = None
    constraint: Callable[[], TokenConstraint | None] = lambda: None
    tools: ToolRequest | None = None
    tool_syntax: Syntax = "hermes"
    llm: LanguageModel | None = None  # the model the request named: the bundle, or one of its adapters


def _off(allowed: str, test: Any) -> tuple[str, Any]:
    return allowed, lambda v: v is None or test(v)


_COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "stop", "stream",
           "stream_options", "n", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "user"}
_OFF = {  # accepted only at the value that asks for nothing: honouring none of them, the server says so
    "logit_bias": _off("{}", lambda v: v == {}),
    "user": _off("a string", lambda v: isinstance(v, str) and valid_unicode(v)),
    "echo": _off("false", lambda v: v is False),
    "best_of": _off("1", lambda v: type(v) is int and v == 1),
    "suffix": _off('""', lambda v: v == ""),
}
CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "top_logprobs", "response_format", "tools", "tool_choice",
                         "parallel_tool_calls"}
COMPLETION_FIELDS = _COMMON | {"prompt", "echo", "best_of", "suffix"}


def prepare(raw: bytes, chat: bool, llm: LanguageModel, deadline: float | None = None) -> Prepared:
    """Parse and check a request body, then render, tokenize and trim its prompt and compile its
    constraint (RequestError if anything is bad: nothing is generated for a bad request)."""
    body = parse_body(raw)
    check_fields(body, CHAT_FIELDS if chat else COMPLETION_FIELDS)
    llm = served_model(body, llm)
    stream = _flag(body.get("stream"), "stream")
    include_usage = _stream_options(body.get("stream_options"), stream)
    max_tokens = _max_tokens(body)
    stop = _stop(body.get("stop"))
    sampling = _sampling(body, llm)
    n = _whole(body.get("n", 1), "n", 1, MAX_CHOICES)
    top_logprobs = _logprobs(body, chat)
    tools, syntax, constraint = None, "hermes", _constraint(llm, {}, "")
    if chat:
        ids, tools, syntax, constraint = _chat_prompt(body, llm, max_tokens, deadline)
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
    return Prepared(ids, max_tokens, sampling, stop, stream, include_usage, n, top_logprobs, constraint, tools, syntax,
                    llm)


def _chat_prompt(body: dict[str, Any], llm: LanguageModel, max_tokens: int | None, deadline: float | None
                 ) -> tuple[list[int], ToolRequest | None, Syntax, Callable[[], TokenConstraint | None]]:
    """The chat prompt's ids (tools rendered by the template, or edgelm's default tool prompt),
    the tool request, the call syntax, and the reply's constraint (response_format, or a forced
    tool_choice), compiled before anything renders."""
    schema = chat_fields.response_schema(body.get("response_format"))
    tools = chat_fields.tool_request(body)
    if schema is not None and tools is not None and tools.mode == "forced":
        raise bad("response_format and a forced tool_choice both constrain the reply; send one", "response_format")
    spec: dict[str, Any] = {}
    if schema is not None:
        spec = {"json_schema": schema}
    elif tools is not None and tools.mode == "forced":
        spec = {"grammar": call_grammar(tools.tools, tools.parallel)}
    constraint = _constraint(llm, spec, "response_format" if schema is not None else "tool_choice")
    native, syntax = template_syntax(llm.chat_template_source)
    messages = history_for_template(chat_fields.messages(body.get("messages")), native)
    if tools is not None and not native:
        messages = with_tool_prompt(messages, tools.tools)
    try:
        ids = llm.chat_prompt_ids(messages, max_tokens, deadline=deadline,
                                  tools=tools.tools if tools is not None and native else None)
    except PromptDeadlineError:
        raise prepare_timeout() from None
    except EdgelmRuntimeError as exc:
        raise bad(public(exc.message, llm.path), "messages") from None
    return ids, tools, syntax, constraint


def _constraint(llm: LanguageModel, spec: dict[str, Any], field: str) -> Callable[[], TokenConstraint | None]:
    """A factory of fresh matchers; the first is compiled now, so a bad schema is this request's 400."""
    if not spec:
        return lambda: None
    try:
        first: list[TokenConstraint | None] = [llm.constraint(**spec)]
    except EdgelmRuntimeError as exc:
        raise bad(exc.message, field) from None
    return lambda: first.pop() if first else llm.constraint(**spec)


def _logprobs(body: dict[str, Any], chat: bool) -> int | None:
    """How many alternatives each token's logprobs entry lists (None: no logprobs)."""
    value = body.get("logprobs")
    if chat:
        if value is not None and not isinstance(value, bool):
            raise bad("logprobs must be true or false", "logprobs")
        top = body.get("top_logprobs")
        if top is not None:
            if not value:
                raise bad("top_logprobs needs logprobs: true", "top_logprobs")
            return _whole(top, "top_logprobs", 0, MAX_TOP_LOGPROBS)
        return 0 if value else None
    if value is None or value is False:
        return None
    return _whole(value, "logprobs", 0, 5)


def _whole(value: Any, name: str, low: int, high: int) -> int:
    if not is_whole(value) or not low <= value <= high:
        raise bad(f"{name} must be a whole number from {low} to {high}", name)
    return value


def check_fields(body: dict[str, Any], allowed: set[str]) -> None:
    """Unknown fields are a 400, and so are fields this server cannot honour unless at their off value."""
    for name, value in body.items():
        if name not in allowed:
            raise bad(f"unknown field {show(name)} (this server does not support it)", param(name))
        if name in _OFF and not _OFF[name][1](value):
            raise bad(f"{name} is not supported here: send {_OFF[name][0]} or leave it out", name)


def served_model(body: dict[str, Any], llm: LanguageModel) -> LanguageModel:
    """The model a request names: the bundle (its name, or `model` left out) or one of its runtime
    LoRA adapters as "<bundle>:<adapter>" (as /v1/models lists them); anything else is a 404."""
    model, name = body.get("model"), llm.manifest.name
    if model is None or model == name:
        return llm
    check_text(model, "model")
    base, _, adapter = model.rpartition(":")
    if base == name and adapter in llm.adapters:
        return llm.with_adapter(adapter)
    served = ", ".join(repr(m) for m in model_ids(llm))
    raise RequestError(404, f"model {show(model)} is not served here; this endpoint serves {served}", "model",
                       code="model_not_found")


def model_ids(model: Any) -> list[str]:
    """The ids /v1/models lists for a served bundle: its name, then "<name>:<adapter>" for each adapter."""
    name = model.manifest.name
    return [name, *(f"{name}:{adapter}" for adapter in getattr(model, "adapters", []))]


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
                              ("repetition_penalty", "> 0", lambda v: v > 0),
                              ("presence_penalty", "in [-2, 2]", lambda v: -2 <= v <= 2),
                              ("frequency_penalty", "in [-2, 2]", lambda v: -2 <= v <= 2)):
        value = body.get(name)
        if value is not None and not (is_real(value) and ok(value)):
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




__all__ = ["RequestError", "bad", "check_text", "check_unicode", "is_whole", "parse_body", "public", "show"]
