"""Tool calling: OpenAI function tools in the prompt, the model's calls parsed out of its reply.

Syntax. A bundle whose chat template takes a `tools` variable renders the tools itself (Qwen,
Hermes, Llama 3 templates do). Its calls are read in the syntax the template teaches: Hermes/Qwen
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks, or a Llama 3 reply that is one
`{"name": ..., "parameters": {...}}` object. A template without tool support (SmolLM2's) gets
edgelm's default: the tools as JSON in a system message that asks for the Hermes syntax, and
history turns rewritten into that syntax (assistant calls as `<tool_call>` blocks, tool results as
user turns in `<tool_response>` blocks), so one parser reads every bundle.

`tool_choice` "required" or a named function is enforced with the grammar engine
(constrained.py): the reply can only be calls whose name is a declared one and whose arguments
match that function's JSON schema."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from edgelm_runtime.constrained import JSON_LAYOUT

Syntax = Literal["hermes", "llama3"]
OPEN, CLOSE = "<tool_call>", "</tool_call>"
DEFAULT_TOOL_PROMPT = (
    "You can call functions. The functions, as JSON schemas:\n{tools}\n\n"
    "To call one, reply with only\n<tool_call>\n{{\"name\": <function name>, \"arguments\": <arguments object>}}\n"
    "</tool_call>\nand one such block per call. Otherwise, answer normally.")
_BLOCK = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*(?:" + re.escape(CLOSE) + r"|$)", re.S)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as the OpenAI API sends it
    id: str

    def to_openai(self, index: int | None = None) -> dict[str, Any]:
        call = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


def template_syntax(template_source: str) -> tuple[bool, Syntax]:
    """(whether the chat template renders `tools` itself, the call syntax to read)."""
    native = re.search(r"\btools\b", template_source) is not None
    if native and OPEN not in template_source and ("ipython" in template_source or "parameters" in template_source):
        return True, "llama3"
    return native, "hermes"


def function_schema(tool: dict[str, Any]) -> dict[str, Any]:
    """The JSON schema of one call of `tool`: its name fixed, its arguments its parameters."""
    function = tool["function"]
    parameters = dict(function.get("parameters") or {"type": "object", "properties": {}})
    parameters.setdefault("additionalProperties", False)  # only the declared arguments (OpenAI's strict mode)
    return {"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
            "properties": {"name": {"const": function["name"]}, "arguments": parameters}}


def call_grammar(tools: Sequence[dict[str, Any]], parallel: bool) -> str:
    """A Lark grammar (llguidance's, with %json) whose only sentences are Hermes tool calls of `tools`."""
    schema = {"anyOf": [function_schema(tool) for tool in tools]} if len(tools) > 1 else function_schema(tools[0])
    schema["x-guidance"] = JSON_LAYOUT
    calls = 'call ("\\n" call)*' if parallel else "call"
    return (f"start: {calls}\n"
            f'call: "{OPEN}\\n" body "\\n{CLOSE}"\n'
            f"body: %json {json.dumps(schema)}\n")


def with_tool_prompt(messages: list[dict[str, Any]], tools: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """`messages` with edgelm's default tool prompt in the system message (for templates without tools)."""
    listing = "\n".join(json.dumps(tool["function"], ensure_ascii=False) for tool in tools)
    prompt = DEFAULT_TOOL_PROMPT.format(tools=listing)
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": messages[0]["content"] + "\n\n" + prompt}, *messages[1:]]
    return [{"role": "system", "content": prompt}, *messages]


def history_for_template(messages: list[dict[str, Any]], native: bool) -> list[dict[str, Any]]:
    """Assistant tool-call turns and tool results as the template can render them: for a template
    with tool support, transformers' form (arguments as objects); otherwise edgelm's default syntax."""
    out = []
    for message in messages:
        calls = message.get("tool_calls") or []
        if native:
            fixed = dict(message)
            if calls:
                fixed["tool_calls"] = [{"type": "function", "function": {"name": c["function"]["name"],
                                        "arguments": _arguments_object(c["function"]["arguments"])}} for c in calls]
                fixed["content"] = fixed.get("content") or ""
            out.append(fixed)
        elif message["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{message['content']}\n</tool_response>"})
        elif calls:
            blocks = "\n".join(f"{OPEN}\n" + json.dumps({"name": c["function"]["name"],
                                                          "arguments": _arguments_object(c["function"]["arguments"])},
                                                         ensure_ascii=False) + f"\n{CLOSE}" for c in calls)
            text = message.get("content") or ""
            out.append({"role": "assistant", "content": (text + "\n" if text else "") + blocks})
        else:
            out.append({key: value for key, value in message.items() if key != "tool_call_id"})
    return out


def _arguments_object(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def parse_tool_calls(text: str, tools: Sequence[dict[str, Any]], syntax: Syntax) -> tuple[str | None, list[ToolCall]]:
    """(the reply's text outside its calls, or None when there is none; the calls). A block that is
    not JSON of a declared function's call stays in the text: nothing is invented or dropped."""
    names = {tool["function"]["name"] for tool in tools}
    if syntax == "llama3" and OPEN not in text:
        call = _call(text.strip(), names, ("parameters", "arguments"))
        return (None, [call]) if call else (text, [])
    calls, kept, end = [], [], 0
    for match in _BLOCK.finditer(text):
        call = _call(match.group(1), names, ("arguments", "parameters"))
        if call is None:
            continue
        kept.append(text[end:match.start()])
        end = match.end()
        calls.append(call)
    kept.append(text[end:])
    rest = "".join(kept).strip()
    return (rest or None) if calls else text, calls


def _call(body: str, names: set[str], argument_keys: tuple[str, ...]) -> ToolCall | None:
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("name") not in names:
        return None
    arguments = next((data[key] for key in argument_keys if key in data), {})
    if not isinstance(arguments, dict):
        return None
    return ToolCall(data["name"], json.dumps(arguments, ensure_ascii=False), f"call_{uuid.uuid4().hex[:24]}")


def repeats_a_call(text: str) -> bool:
    """Whether the last complete `<tool_call>` block of `text` repeats an earlier one verbatim (as
    JSON): small models asked for parallel calls loop on the first, so the reply ends there."""
    bodies = [match.group(1) for match in _BLOCK.finditer(text) if match.group(0).endswith(CLOSE)]
    if len(bodies) < 2:
        return False
    try:
        parsed = [json.loads(body) for body in bodies]
    except ValueError:
        return False
    return parsed[-1] in parsed[:-1]


class CallDetector:
    """For a stream with tools: passes content through until a call starts (`<tool_call>`, or a
    Llama 3 reply that opens with `{`), holding back any tail that may still become one."""

    def __init__(self, syntax: Syntax) -> None:
        self._syntax = syntax
        self._held = ""
        self.in_call = False
        self.text = ""  # everything generated
        self.emitted = 0  # characters of it passed on as content

    def push(self, piece: str) -> str:
        out = self._push(piece)
        self.emitted += len(out)
        return out

    def _push(self, piece: str) -> str:
        self.text += piece
        if self.in_call:
            return ""
        held = self._held + piece
        if self._syntax == "llama3" and not self.text.strip():
            self._held = held
            return ""
        if self._syntax == "llama3" and self.text.lstrip().startswith("{"):
            self.in_call, self._held = True, ""
            return ""
        index = held.find(OPEN)
        if index >= 0:
            self.in_call, self._held = True, ""
            return held[:index]
        keep = next((k for k in range(min(len(OPEN) - 1, len(held)), 0, -1) if OPEN.startswith(held[-k:])), 0)
        self._held = held[len(held) - keep:]
        return held[:len(held) - keep]

    def flush(self) -> str:
        held, self._held = self._held, ""
        out = "" if self.in_call else held
        self.emitted += len(out)
        return out
