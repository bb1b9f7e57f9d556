"""Render chat messages into a prompt with the bundle's Jinja chat template, in a sandbox.

Templates come with downloaded models, so they are untrusted: they render in jinja2's
ImmutableSandboxedEnvironment (no attribute escapes, no mutation), configured like transformers'
apply_chat_template so a bundle's prompts match the model's own. Bundles without a chat template
get CHATML_TEMPLATE: `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from edgelm_runtime.errors import GenerationError, TemplateError

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_FALLBACK_NAME = "<built-in ChatML template>"


def _raise_exception(message: str) -> None:
    raise TemplateError(str(message), hint="the template rejected these messages")


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value: Any, indent: int | None = None) -> str:
    # transformers' tojson: plain JSON, non-ASCII kept (jinja's own escapes <, >, & and ')
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    env.filters["tojson"] = _tojson
    return env


class ChatTemplate:
    """A compiled chat template; `name` (its file) appears in every error it raises."""

    def __init__(self, source: str, name: str, bos_token: str | None = None, eos_token: str | None = None) -> None:
        self.name = name
        self.source = source
        self._tokens = {"bos_token": bos_token or "", "eos_token": eos_token or ""}
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateError as exc:
            raise TemplateError(f"{name}: the chat template does not compile ({_describe(exc)})",
                                hint="fix the template file, or rebuild the bundle") from None

    @classmethod
    def from_file(cls, path: Path, bos_token: str | None = None, eos_token: str | None = None) -> ChatTemplate:
        try:
            source = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise TemplateError(f"{path}: cannot read the chat template ({exc})", hint="rebuild the bundle") from None
        return cls(source, str(path), bos_token, eos_token)

    @classmethod
    def fallback(cls, bos_token: str | None = None, eos_token: str | None = None) -> ChatTemplate:
        return cls(CHATML_TEMPLATE, _FALLBACK_NAME, bos_token, eos_token)

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        _check_messages(messages)
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **self._tokens)
        except TemplateError as exc:  # raise_exception() inside the template
            raise TemplateError(f"{self.name}: {exc.message}", hint=exc.hint) from None
        except jinja2.TemplateError as exc:  # SecurityError (a sandbox escape) is one of these
            raise TemplateError(f"{self.name}: the chat template failed ({_describe(exc)})",
                                hint="the template is broken or unsafe; fix it or rebuild the bundle") from None
        except (TypeError, ValueError, LookupError, ArithmeticError) as exc:
            raise TemplateError(f"{self.name}: the chat template failed ({type(exc).__name__}: {exc})",
                                hint="check the messages' roles and contents, or fix the template") from None


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise GenerationError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts",
                              hint='pass e.g. [{"role": "user", "content": "Hi"}]')
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise GenerationError(f"messages[{index}] is not a dict with a string 'role'",
                                  hint='pass e.g. {"role": "user", "content": "Hi"}')


def _describe(exc: jinja2.TemplateError) -> str:
    line = getattr(exc, "lineno", None)
    return f"{type(exc).__name__}: {exc}" + (f", line {line}" if line else "")
