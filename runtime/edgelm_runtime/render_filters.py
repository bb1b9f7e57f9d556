"""Size limits for the jinja2 filters and tests a chat template calls (templates.py wires them in):
each filter whose result can be large is sized from its arguments BEFORE it runs, with the same
limits as render_limits.py (split from it to keep each module readable)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from jinja2 import pass_environment
from jinja2.filters import make_attrgetter

from edgelm_runtime.render_limits import (
    MAX_INT_BITS,
    MAX_RENDER_CHARS,
    _int_too_big,
    _join_size,
    _replace_size,
    check_binop,
    check_int_args,
    checked,
    measure,
    percent_size,
    tick,
    too_big,
)


def _arg(args: list[Any], kwargs: dict[str, Any], index: int, key: str, default: Any) -> Any:
    return args[index] if len(args) > index else kwargs.get(key, default)


def _pre_join(lead: tuple[Any, ...], args: list[Any], kwargs: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    separator, attribute = _arg(args, kwargs, 1, "d", ""), _arg(args, kwargs, 2, "attribute", None)
    items = list(args[0])
    if attribute is not None:  # read the attributes here, so the pieces are sized before the join
        getter = make_attrgetter(lead[0].environment, attribute)
        items = [getter(item) for item in items]
    if _join_size(str(separator), items) > MAX_RENDER_CHARS:
        raise too_big("joins past the size limit")
    return [items, separator], {}


def _pre_format(lead: tuple[Any, ...], args: list[Any], kwargs: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    if args and percent_size(str(args[0]), kwargs or tuple(args[1:])) > MAX_RENDER_CHARS:
        raise too_big("formats a string past the size limit")
    return args, kwargs


def _pre_indent(lead: tuple[Any, ...], args: list[Any], kwargs: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    text, width = str(args[0]) if args else "", _arg(args, kwargs, 1, "width", 4)
    width_chars = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
    if len(text) + (text.count("\n") + 1) * max(width_chars, 0) > MAX_RENDER_CHARS:
        raise too_big("indents past the size limit")
    return args, kwargs


def _pre_wordwrap(lead: tuple[Any, ...], args: list[Any], kwargs: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    text, width = str(args[0]) if args else "", _arg(args, kwargs, 1, "width", 79)
    wrapstring = _arg(args, kwargs, 3, "wrapstring", None) or "\n"
    if isinstance(width, int) and width > 0:  # a greedy wrap's two neighbouring lines hold more than `width`
        lines = 2 * len(text) // width + text.count("\n") + 2
        if len(text) + lines * len(str(wrapstring)) > MAX_RENDER_CHARS:
            raise too_big("wraps words past the size limit")
    return args, kwargs


def _pre_replace(lead: tuple[Any, ...], args: list[Any], kwargs: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    if len(args) >= 3 and _replace_size(str(args[0]), str(args[1]), str(args[2]),
                                        _arg(args, kwargs, 3, "count", None)) > MAX_RENDER_CHARS:
        raise too_big("replaces past the size limit")
    return args, kwargs


def _pre_urlize(lead: tuple[Any, ...], args: list[Any], kwargs: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    text = str(args[0]) if args else ""  # a link is a bounded multiple of its word, plus target= and rel=
    extra = sum(len(str(_arg(args, kwargs, i, key, None) or "")) for i, key in ((3, "target"), (4, "rel")))
    if len(text) + (text.count(" ") + text.count("\n") + 1) * extra > MAX_RENDER_CHARS:
        raise too_big("urlizes past the size limit")
    return args, kwargs


def _pre_tojson(lead: tuple[Any, ...], args: list[Any], kwargs: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    indent, separators = _arg(args, kwargs, 2, "indent", None), _arg(args, kwargs, 3, "separators", None)
    per_level = len(indent) if isinstance(indent, str) else max(indent, 0) if isinstance(indent, int) else 0
    per_item = sum(len(s) for s in separators if isinstance(s, str)) if isinstance(separators, (list, tuple)) else 0
    if args and measure(args[0], per_item=per_item + (indent is not None), per_level=per_level) > MAX_RENDER_CHARS:
        raise too_big("writes JSON past the size limit")
    return args, kwargs


def _pre_pprint(lead: tuple[Any, ...], args: list[Any], kwargs: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    # pprint indents long strings' chunks by their depth, in C-level loops: only small values
    if args and measure(args[0], MAX_RENDER_CHARS // 64) > MAX_RENDER_CHARS // 64:
        raise too_big("pretty-prints a value too big for pprint")
    return args, kwargs


def _pre_int(lead: tuple[Any, ...], args: list[Any], kwargs: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    if args and isinstance(args[0], (str, bytes)) and len(args[0]) > MAX_INT_BITS // 3:
        raise _int_too_big("parses", len(args[0]) * 3)
    return args, kwargs


def _pre_striptags(lead: tuple[Any, ...], args: list[Any], kwargs: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    # markupsafe strips one tag at a time, copying the rest of the text each time, in one Python frame
    text = str(args[0]) if args else ""
    if text.count("<") * len(text) > 64 * MAX_RENDER_CHARS:
        raise too_big("strips tags from a text too big for striptags")
    return args, kwargs


_PRECHECKS: dict[str, Callable[..., tuple[list[Any], dict[str, Any]]]] = {
    "join": _pre_join, "format": _pre_format, "indent": _pre_indent, "wordwrap": _pre_wordwrap,
    "replace": _pre_replace, "urlize": _pre_urlize, "tojson": _pre_tojson, "pprint": _pre_pprint, "int": _pre_int,
    "striptags": _pre_striptags,
}


@pass_environment
def bounded_sum(environment: Any, iterable: Any, attribute: Any = None, start: Any = 0) -> Any:
    """The sum filter, one sized `+` at a time (sum(lists, start=[]) copies quadratically in C)."""
    if attribute is not None:
        iterable = map(make_attrgetter(environment, attribute), iterable)
    total = start
    for item in iterable:
        tick()
        check_binop("+", total, item)
        total = total + item
    return total



_SIZE_ARGS = frozenset({"center", "indent", "wordwrap", "truncate", "batch", "slice"})  # filters with width-like ints


def bounded_filter(name: str, function: Any) -> Any:
    passes_arg = getattr(function, "jinja_pass_arg", None) is not None
    precheck, sizes = _PRECHECKS.get(name), name in _SIZE_ARGS
    what = f"builds a value past the size limit (filter {name})"

    def bounded(*given: Any, **kwargs: Any) -> Any:
        tick()
        lead, args = (given[:1], list(given[1:])) if passes_arg else ((), list(given))
        if sizes:
            check_int_args(args[1:])
            check_int_args(kwargs.values())
        if precheck is not None:
            args, kwargs = precheck(lead, args, kwargs)
        return checked(function(*lead, *args, **kwargs), what)

    for attribute in ("jinja_pass_arg", "__name__"):  # jinja2 reads how to call a filter from these
        if hasattr(function, attribute):
            setattr(bounded, attribute, getattr(function, attribute))
    return bounded


def bounded_test(function: Any) -> Any:
    """Tests (`is divisibleby(n)`, ...) with the deadline and integer sizes checked."""
    def bounded(*args: Any, **kwargs: Any) -> Any:
        tick()
        for value in (*args, *kwargs.values()):
            if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
                raise _int_too_big("tests", value.bit_length())
        return function(*args, **kwargs)

    for attribute in ("jinja_pass_arg", "__name__"):
        if hasattr(function, attribute):
            setattr(bounded, attribute, getattr(function, attribute))
    return bounded
