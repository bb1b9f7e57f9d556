"""The chat-specific fields of `/v1/chat/completions`, checked one by one: messages (tool-call
turns, tool results and text content parts included), tools, tool_choice, response_format.

Each check raises requests.RequestError naming the field; nothing is coerced or ignored."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from edgelm_runtime.request_checks import RequestError, bad, check_unicode, show

MAX_MESSAGES = 4096  # per request; far past any edge context, and each one costs a render
MAX_TOOLS = 128
_ROLES = {"system", "developer", "user", "assistant", "tool"}
_MESSAGE_FIELDS = {"role", "content", "name", "tool_calls", "tool_call_id", "refusal"}
_FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True)
class ToolRequest:
    """What the request asks of tools: the declared ones, and how the reply may use them."""

    tools: list[dict[str, Any]]
    mode: str             # "auto": the model may call; "forced": it must (required or a named function)
    parallel: bool
    forced_name: str | None = None


def messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise bad("messages must be a non-empty list of {role, content} objects", "messages")
    if len(value) > MAX_MESSAGES:
        raise bad(f"messages has {len(value)} entries; at most {MAX_MESSAGES} are allowed per request", "messages")
    return [_message(message, f"messages[{index}]") for index, message in enumerate(value)]


def _message(message: Any, where: str) -> dict[str, Any]:
    if not isinstance(message, dict):
        raise bad(f"{where} must be an object with a role and a content", where)
    for key, value in message.items():
        if key not in _MESSAGE_FIELDS and value not in (None, [], {}):
            raise bad(f"{where}.{show(key)} is not supported here", f"{where}.{key}"[:64])
    role = message.get("role")
    if role not in _ROLES:
        raise bad(f"{where}.role must be one of: {', '.join(sorted(_ROLES))}", f"{where}.role")
    calls = message.get("tool_calls")
    content = _content(message.get("content"), f"{where}.content", optional=role == "assistant" and bool(calls))
    kept: dict[str, Any] = {"role": "system" if role == "developer" else role, "content": content}
    if message.get("name") is not None:
        kept["name"] = _text(message["name"], f"{where}.name")
    if calls not in (None, []):
        if role != "assistant":
            raise bad(f"{where}.tool_calls is only allowed on an assistant message", f"{where}.tool_calls")
        kept["tool_calls"] = _tool_calls(calls, f"{where}.tool_calls")
    if role == "tool":
        kept["tool_call_id"] = _text(message.get("tool_call_id"), f"{where}.tool_call_id")
    return kept


def _content(value: Any, where: str, optional: bool) -> str:
    """A string, or a list of {"type": "text", "text": ...} parts (joined); None only where allowed."""
    if value is None and optional:
        return ""
    if isinstance(value, list):
        texts = []
        for index, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else None
                raise bad(f"{where}[{index}] must be a text part {{\"type\": \"text\", \"text\": ...}}"
                          + (f" (a {show(kind)} part needs a model that reads it)" if kind else ""), f"{where}[{index}]")
            texts.append(part["text"])
        value = "".join(texts)
    if not isinstance(value, str):
        raise bad(f"{where} must be a string or a list of text parts", where)
    check_unicode(value, where)
    return value


def _tool_calls(calls: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(calls, list):
        raise bad(f"{where} must be a list of tool calls", where)
    clean = []
    for index, call in enumerate(calls):
        at = f"{where}[{index}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or call.get("type", "function") != "function":
            raise bad(f'{at} must be {{"id": ..., "type": "function", "function": {{"name": ..., "arguments": ...}}}}', at)
        name = _text(function.get("name"), f"{at}.function.name")
        arguments = _text(function.get("arguments"), f"{at}.function.arguments")
        try:
            json.loads(arguments)
        except ValueError:
            raise bad(f"{at}.function.arguments is not JSON text", f"{at}.function.arguments") from None
        clean.append({"id": str(call.get("id") or f"call_{index}"), "type": "function",
                      "function": {"name": name, "arguments": arguments}})
    return clean


def tool_request(body: dict[str, Any]) -> ToolRequest | None:
    """The request's tools and tool_choice (None: the reply is text, with no tools rendered)."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise bad("parallel_tool_calls must be true or false", "parallel_tool_calls")
    if tools in (None, []):
        if choice not in (None, "none", "auto"):
            raise bad("tool_choice needs tools: declare the functions in tools", "tool_choice")
        return None
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise bad(f"tools must be a list of at most {MAX_TOOLS} function tools", "tools")
    declared = [_tool(tool, f"tools[{index}]") for index, tool in enumerate(tools)]
    names = [tool["function"]["name"] for tool in declared]
    if len(set(names)) != len(names):
        raise bad("tools declares a function name twice", "tools")
    if choice in (None, "auto"):
        return ToolRequest(declared, "auto", parallel)
    if choice == "none":
        return None
    if choice == "required":
        return ToolRequest(declared, "forced", parallel)
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) and choice.get("type") == "function" \
        and isinstance(choice.get("function"), dict) else None
    if name is None:
        raise bad('tool_choice must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}',
                  "tool_choice")
    if name not in names:
        raise bad(f"tool_choice names {show(name)}, which tools does not declare", "tool_choice")
    return ToolRequest([t for t in declared if t["function"]["name"] == name], "forced", False, name)


def _tool(tool: Any, where: str) -> dict[str, Any]:
    function = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(function, dict) or tool.get("type") != "function":
        raise bad(f'{where} must be {{"type": "function", "function": {{"name": ..., "parameters": ...}}}}', where)
    name = function.get("name")
    if not isinstance(name, str) or not _FUNCTION_NAME.fullmatch(name):
        raise bad(f"{where}.function.name must be 1-64 letters, digits, _ or -", f"{where}.function.name")
    unknown = set(function) - {"name", "description", "parameters", "strict"}
    if unknown:
        raise bad(f"{where}.function.{show(sorted(unknown)[0])} is not supported here", f"{where}.function")
    parameters = function.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(parameters, dict):
        raise bad(f"{where}.function.parameters must be a JSON schema object", f"{where}.function.parameters")
    description = function.get("description", "")
    if not isinstance(description, str):
        raise bad(f"{where}.function.description must be a string", f"{where}.function.description")
    return {"type": "function", "function": {"name": name, "description": description, "parameters": parameters}}


def response_schema(value: Any) -> Any:
    """The JSON schema `response_format` asks the reply to follow (None for plain text)."""
    if value is None or value == {"type": "text"}:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema" and isinstance(value.get("json_schema"), dict):
        spec = value["json_schema"]
        schema = spec.get("schema", {"type": "object"})
        if not isinstance(schema, dict):
            raise bad("response_format.json_schema.schema must be a JSON schema object", "response_format")
        return schema
    raise bad('response_format must be {"type": "text"}, {"type": "json_object"} or '
              '{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}', "response_format")


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise bad(f"{name} must be a string", name)
    check_unicode(value, name)
    return value


__all__ = ["RequestError", "ToolRequest", "messages", "response_schema", "tool_request"]
