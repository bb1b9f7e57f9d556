"""Render chat messages into a prompt with the bundle's Jinja chat template, in a sandbox.

Templates come with downloaded models, so they are untrusted: they render in jinja2's
ImmutableSandboxedEnvironment (no attribute escapes, no mutation), configured like transformers'
apply_chat_template so a bundle's prompts match the model's own (the same globals, tojson and
namespace, `{% generation %}` blocks, `tools` and `documents` None unless given). Bundles without
a chat template get CHATML_TEMPLATE: `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message.

jinja2's sandbox stops escapes, not exhaustion: `{% for i in range(99999) %}` nested three deep
runs for hours, and `'x' * 10**10` or `('\\t' * 3000).expandtabs(999999)` eats all memory in one C
call. So rendering is bounded here, by hand (no library does it; render_limits.py has the rules):
a deadline (MAX_RENDER_SECONDS, per thread) checked on every loop iteration, call, operator,
filter and output piece; every value the template builds sized before it is built (operators,
str methods, filters, format strings, literals, block and macro output): at most MAX_RENDER_CHARS
characters, integers at most MAX_INT_BITS bits, all of one render's values together at most
MAX_BUILT_CHARS; calls nested at most MAX_CALL_DEPTH deep; the output at most MAX_RENDER_CHARS;
the source at most MAX_TEMPLATE_CHARS (compiling is linear in it, once per bundle load). edgelm
renders templates at build time (calibration) through this same class."""

from __future__ import annotations

import functools
import json
import types
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.compiler import CodeGenerator
from jinja2.exceptions import SecurityError
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment, SandboxedEscapeFormatter, SandboxedFormatter
from jinja2.utils import Namespace
from markupsafe import Markup

from edgelm_runtime.errors import GenerationError, TemplateError
from edgelm_runtime.render_filters import bounded_filter, bounded_sum, bounded_test
from edgelm_runtime.render_limits import (
    MAX_CALL_DEPTH,
    MAX_INT_BITS,
    MAX_RENDER_CHARS,
    MAX_RENDER_SECONDS,
    MAX_TEMPLATE_CHARS,
    BoundedFormatterMixin,
    RenderLimitError,
    check_binop,
    check_int_args,
    check_lipsum,
    check_method,
    checked,
    enter_call,
    is_lipsum,
    leave_call,
    measure,
    render_deadline,
    shallow_size,
    spend,
    tick,
    ticking,
    too_big,
)
from edgelm_runtime.tokenizer import check_text

__all__ = ["CHATML_TEMPLATE", "MAX_CALL_DEPTH", "MAX_INT_BITS", "MAX_RENDER_CHARS", "MAX_RENDER_SECONDS",
           "BoundedSandbox", "ChatTemplate", "RenderLimitError", "render_deadline"]

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
    if len(str(fmt)) * 16 > MAX_RENDER_CHARS:  # %c writes 24 characters for 2
        raise too_big("passes strftime_now() a huge format")
    return datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # transformers' tojson: plain JSON, non-ASCII kept (jinja's own escapes <, >, & and ')
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _GenerationTag(Extension):
    """transformers' `{% generation %}...{% endgeneration %}` (marks assistant text for training masks): renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


class _BoundedCodeGenerator(CodeGenerator):
    """Compiles `a ~ b` and list/tuple/dict literals to size-checked calls."""

    def visit_Concat(self, node: Any, frame: Any) -> None:
        self.write("environment.bounded_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")

    def _literal(self, visit: Any, node: Any, frame: Any) -> None:
        self.write("environment.bounded_literal(")
        visit(node, frame)
        self.write(")")

    def visit_List(self, node: Any, frame: Any) -> None:
        self._literal(super().visit_List, node, frame)

    def visit_Dict(self, node: Any, frame: Any) -> None:
        self._literal(super().visit_Dict, node, frame)

    def visit_Tuple(self, node: Any, frame: Any) -> None:
        if node.ctx == "load":
            self._literal(super().visit_Tuple, node, frame)
        else:  # an assignment target: `{% for a, b in ... %}`
            super().visit_Tuple(node, frame)


class _Formatter(BoundedFormatterMixin, SandboxedFormatter):
    pass


class _EscapeFormatter(BoundedFormatterMixin, SandboxedEscapeFormatter):
    pass


class _Namespace(Namespace):
    """transformers' TemplateNamespace (no underscore-prefixed names), its attributes kept within the size limit."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _check_name(name)
        Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _check_name(name)
        tick()
        attrs = object.__getattribute__(self, "_Namespace__attrs")
        if measure({**attrs, name: value}) > MAX_RENDER_CHARS:
            raise too_big("stores past the size limit in a namespace")
        Namespace.__setitem__(self, name, value)


def _check_name(name: Any) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise SecurityError(f"a namespace cannot hold the underscore-prefixed attribute {name!r}")


class BoundedSandbox(ImmutableSandboxedEnvironment):
    code_generator_class = _BoundedCodeGenerator
    intercepted_binops = frozenset({"+", "-", "*", "/", "//", "%", "**"})

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        template = super()._parse(source, name, filename)
        for loop in list(template.find_all(nodes.For)):  # every iteration checks the deadline
            bounded = nodes.Call(nodes.EnvironmentAttribute("bounded_iter"), [loop.iter], [], None, None)
            loop.iter = bounded.set_lineno(loop.iter.lineno).set_environment(self)
        return template

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        tick()
        if operator == "+" and type(left) is str and type(right) is str:  # most of a real template's operators
            if len(left) + len(right) > MAX_RENDER_CHARS:
                raise too_big("concatenates past the size limit")
            spend(len(left) + len(right))
            return left + right
        if check_binop(operator, left, right):  # sized the result already
            result = super().call_binop(context, operator, left, right)
            spend(shallow_size(result))
            return result
        return checked(super().call_binop(context, operator, left, right))

    def bounded_concat(self, parts: tuple[Any, ...]) -> str:
        tick()
        texts = [str(part) for part in parts]
        size = sum(map(len, texts))
        if size > MAX_RENDER_CHARS:
            raise too_big("concatenates (~) past the size limit")
        spend(size)
        return "".join(texts)

    def concat(self, pieces: Any) -> str:  # the output of macros, caller(), {% set %} and {% filter %} blocks
        pieces = pieces if isinstance(pieces, list) else list(pieces)
        size = sum(map(len, pieces))
        if size > MAX_RENDER_CHARS:
            raise too_big("builds a block past the size limit")
        spend(size)
        return "".join(pieces)

    def bounded_literal(self, value: Any) -> Any:
        tick()
        return checked(value, "builds a literal past the size limit")

    def bounded_iter(self, iterable: Any) -> Any:
        tick()
        return ticking(iterable)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 (jinja2's signature)
        tick()
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, (str, bytes, int)):  # methods of scalars take widths and lengths
            check_int_args(args)
            check_int_args(kwargs.values())
            if not isinstance(owner, int):
                args = check_method(owner, getattr(__obj, "__name__", ""), args, kwargs)
        elif is_lipsum(__obj):
            check_lipsum(args, kwargs)
        depth = enter_call()
        try:
            result = super().call(__context, __obj, *args, **kwargs)
        finally:
            leave_call(depth)
        return checked(result)

    def wrap_str_format(self, value: Any) -> Any:
        """jinja2's sandboxed str.format / format_map, with fields sized before they are formatted."""
        if not isinstance(value, (types.MethodType, types.BuiltinMethodType)) \
                or value.__name__ not in ("format", "format_map") or not isinstance(value.__self__, str):
            return None
        owner, is_map = value.__self__, value.__name__ == "format_map"
        formatter = _EscapeFormatter(self, escape=owner.escape) if isinstance(owner, Markup) else _Formatter(self)

        def wrapper(*args: Any, **kwargs: Any) -> str:
            if is_map:
                if kwargs or len(args) != 1:
                    raise TypeError("format_map() takes exactly one positional argument")
                args, kwargs = (), args[0]
            return type(owner)(formatter.vformat(owner, args, kwargs))

        return functools.update_wrapper(wrapper, value)


def _environment() -> BoundedSandbox:
    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols])
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, namespace=_Namespace)
    env.filters.update(tojson=_tojson, sum=bounded_sum)
    env.filters.update({name: bounded_filter(name, function) for name, function in env.filters.items()})
    env.tests.update({name: bounded_test(function) for name, function in env.tests.items()})
    return env


class ChatTemplate:
    """A compiled chat template; `name` (its file) appears in every error it raises."""

    def __init__(self, source: str, name: str, bos_token: str | None = None, eos_token: str | None = None) -> None:
        self.name = name
        self.source = source
        self._tokens = {"bos_token": bos_token or "", "eos_token": eos_token or ""}
        if len(source) > MAX_TEMPLATE_CHARS:
            raise RenderLimitError(f"{name}: the chat template is {len(source)} characters long "
                                   f"(limit {MAX_TEMPLATE_CHARS})", hint="fix the template file, or rebuild the bundle")
        try:
            self._template = _environment().from_string(source)
        except (jinja2.TemplateError, RecursionError, MemoryError, SyntaxError, ValueError) as exc:
            detail = _describe(exc) if isinstance(exc, jinja2.TemplateError) else f"{type(exc).__name__}: {exc}"
            raise TemplateError(f"{name}: the chat template does not compile ({detail})",
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

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
               tools: list[dict[str, Any]] | None = None, documents: list[dict[str, Any]] | None = None) -> str:
        """The prompt; safe to call from any thread (each render has its own deadline)."""
        _check_messages(messages)
        try:
            with render_deadline(self.name):
                pieces, size = [], 0
                for piece in self._template.generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                                     tools=tools, documents=documents, **self._tokens):
                    size += len(piece)
                    if size > MAX_RENDER_CHARS:
                        raise too_big("renders past the output limit")
                    tick()
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
        except Exception as exc:  # TypeError, KeyError, ... (jinja2's truncate asserts): the template's bug
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
        if isinstance(message.get("content"), str):  # name the message, not a position in the rendered prompt
            check_text(message["content"], f"messages[{index}].content")
    # the messages alone past the prompt limit: the input is too long, not the template broken
    size = sum(len(m["content"]) for m in messages if isinstance(m.get("content"), str))
    if size > MAX_RENDER_CHARS:
        raise GenerationError(f"the messages hold {size} characters; a prompt holds at most {MAX_RENDER_CHARS}",
                              hint="shorten the message (a context of a few thousand tokens holds ~4 characters each)")


def _describe(exc: jinja2.TemplateError) -> str:
    line = getattr(exc, "lineno", None)
    return f"{type(exc).__name__}: {exc}" + (f", line {line}" if line else "")
