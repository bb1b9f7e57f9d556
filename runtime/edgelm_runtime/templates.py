"""Render chat messages into a prompt with the bundle's Jinja chat template, in a sandbox.

Templates come with downloaded models, so they are untrusted: they render in jinja2's
ImmutableSandboxedEnvironment (no attribute escapes, no mutation), configured like transformers'
apply_chat_template so a bundle's prompts match the model's own. Bundles without a chat template
get CHATML_TEMPLATE: `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message.

jinja2's sandbox stops escapes, not exhaustion: `{% for i in range(99999) %}` nested three deep
runs for hours, and `'x' * 10**10` or a doubling `~` loop eats all memory. So rendering is bounded
here, by hand (no library does it): a deadline (MAX_RENDER_SECONDS, checked on every line the
compiled template runs, through a thread-local trace function), an output limit
(MAX_RENDER_CHARS, checked as the template streams), and size checks on the operations that
build big values (+, *, **, %, ~, and integer arguments to calls and filters)."""

from __future__ import annotations

import contextlib
import json
import re
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.compiler import CodeGenerator
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


MAX_RENDER_SECONDS = 1.0      # a real chat template renders in well under a millisecond
MAX_RENDER_CHARS = 1 << 20    # 1 MiB of prompt text: far more than any edge context window
MAX_POWER = 1 << 12           # largest exponent of ** (9**9**9 would compute for minutes)


class RenderLimitError(TemplateError):
    """A template went past a render limit (time, size)."""


def _too_big(what: str) -> RenderLimitError:
    return RenderLimitError(f"the chat template {what} (limit {MAX_RENDER_CHARS} characters)",
                            hint="the template is hostile or broken; fix it or rebuild the bundle")


def _size(value: Any) -> int:
    return len(value) if isinstance(value, (str, bytes, list, tuple)) else 0


class _BoundedCodeGenerator(CodeGenerator):
    """Compiles `a ~ b` to a size-checked join instead of jinja2's unchecked str_join."""

    def visit_Concat(self, node: Any, frame: Any) -> None:
        self.write("environment.bounded_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class BoundedSandbox(ImmutableSandboxedEnvironment):
    code_generator_class = _BoundedCodeGenerator
    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*" and isinstance(right, int) and _size(left) * right > MAX_RENDER_CHARS \
                or operator == "*" and isinstance(left, int) and _size(right) * left > MAX_RENDER_CHARS:
            raise _too_big("repeats a value past the size limit")
        if operator == "+" and _size(left) + _size(right) > MAX_RENDER_CHARS:
            raise _too_big("concatenates past the size limit")
        if operator == "**" and isinstance(right, (int, float)) and abs(right) > MAX_POWER:
            raise RenderLimitError(f"the chat template raises to the power {right} (limit {MAX_POWER})",
                                   hint="the template is hostile or broken; fix it or rebuild the bundle")
        if operator == "%" and isinstance(left, str):
            _check_widths(left)
            _check_int_args((right,) if not isinstance(right, (tuple, dict)) else tuple(right))
            result = super().call_binop(context, operator, left, right)
            if len(result) > MAX_RENDER_CHARS:
                raise _too_big("formats a string past the size limit")
            return result
        return super().call_binop(context, operator, left, right)

    def bounded_concat(self, parts: tuple[Any, ...]) -> str:
        texts = [str(part) for part in parts]
        if sum(map(len, texts)) > MAX_RENDER_CHARS:
            raise _too_big("concatenates (~) past the size limit")
        return "".join(texts)

    def call(self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        _check_int_args(args + tuple(kwargs.values()))
        result = super().call(__context, __obj, *args, **kwargs)
        if _size(result) > MAX_RENDER_CHARS:
            raise _too_big("builds a value past the size limit")
        return result

    def getattr(self, obj: Any, attribute: str) -> Any:
        if isinstance(obj, str) and attribute in ("format", "format_map"):
            _check_widths(obj)
        return super().getattr(obj, attribute)


def _check_widths(text: str) -> None:
    """'{:>999999999}'.format(x) and '%999999999s' % x allocate before anything can check the result."""
    if any(int(number) > MAX_RENDER_CHARS for number in _WIDTHS.findall(text)):
        raise _too_big("formats with a huge width")


_WIDTHS = re.compile(r"(?:%[-#0 +]*|\{[^{}]*:[^{}]*?)(\d{7,})")


def _check_int_args(values: tuple[Any, ...]) -> None:
    """An int argument over the size limit (center(10**9), indent(10**9), ...) is a bomb, not a width."""
    for value in values:
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_RENDER_CHARS:
            raise _too_big(f"passes {value} as an argument")


def _bounded_filter(function: Any) -> Any:
    def bounded(*given: Any, **kwargs: Any) -> Any:
        args = list(given)
        _check_int_args(tuple(args) + tuple(kwargs.values()))
        if function.__name__ in ("sync_do_join", "do_join") and len(args) > 1:  # (eval_ctx, value, d="")
            args[1] = list(args[1])  # size the pieces before joining them
            if sum(len(str(item)) for item in args[1]) > MAX_RENDER_CHARS:
                raise _too_big("joins past the size limit")
        result = function(*args, **kwargs)
        if _size(result) > MAX_RENDER_CHARS:
            raise _too_big(f"builds a value past the size limit (filter {function.__name__})")
        return result

    for attribute in ("jinja_pass_arg", "__name__"):  # jinja2 reads how to call a filter from these
        if hasattr(function, attribute):
            setattr(bounded, attribute, getattr(function, attribute))
    return bounded


@contextlib.contextmanager
def render_deadline(name: str, seconds: float = MAX_RENDER_SECONDS) -> Iterator[None]:
    """Abort the template's Python code once `seconds` have passed (this thread only)."""
    end = time.perf_counter() + seconds
    previous = sys.gettrace()

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        if time.perf_counter() > end:
            raise RenderLimitError(f"{name}: the chat template ran longer than {seconds:g} s",
                                   hint="the template loops (too long or forever); fix it or rebuild the bundle")
        # line events only inside the compiled template (its loops); other frames are checked on entry
        return tracer if frame.f_code.co_filename == "<template>" else None

    sys.settrace(tracer)
    try:
        yield
    finally:
        sys.settrace(previous)


def _environment() -> BoundedSandbox:
    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    env.filters["tojson"] = _tojson
    env.filters.update({name: _bounded_filter(function) for name, function in env.filters.items()})
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
            with render_deadline(self.name):
                pieces, size = [], 0
                for piece in self._template.generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                                     **self._tokens):
                    size += len(piece)
                    if size > MAX_RENDER_CHARS:
                        raise _too_big("renders past the output limit")
                    pieces.append(piece)
            prompt = "".join(pieces)
            if not prompt.strip():
                raise TemplateError("the chat template rendered nothing for these messages",
                                    hint="the template is broken; fix it or rebuild the bundle")
            return prompt
        except RenderLimitError as exc:
            message = exc.message if exc.message.startswith(self.name) else f"{self.name}: {exc.message}"
            raise RenderLimitError(message, hint=exc.hint) from None
        except TemplateError as exc:  # raise_exception() inside the template
            raise TemplateError(f"{self.name}: {exc.message}", hint=exc.hint) from None
        except (MemoryError, RecursionError) as exc:
            raise RenderLimitError(f"{self.name}: the chat template exhausted {'memory' if isinstance(exc, MemoryError) else 'the stack'}",
                                   hint="the template is hostile or broken; fix it or rebuild the bundle") from None
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
