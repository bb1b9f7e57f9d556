"""Time and size limits for rendering untrusted chat templates (templates.py wires them into jinja2).

Time: a deadline per render, kept in thread-local state (a render in a worker thread, as the
server's asyncio.to_thread, has its own) and checked explicitly (`tick`) on every loop iteration,
call, operator, filter, test, literal, format field and output piece. Not by a trace function
(sys.settrace): that cannot interrupt one long C-level call either (`'x' * 10**10`, `pow`,
`str.join`: no Python code runs inside them), CPython silently drops it the first time it raises
inside a finalizer (a dropped generator), and it made every render 3-5x slower. So between two
checks only one operation runs, and every operation that could run long or allocate much is sized
BEFORE it runs, from its operands:

- `measure(value)`: about how many characters a value prints as (str/repr/JSON); containers count
  their elements, shared references count each time, counting stops once past the budget.
- No value a template builds may measure over MAX_RENDER_CHARS, or be an int over MAX_INT_BITS;
  operators, str/bytes methods, filters and format strings are bounded by their result size.
- All the values one render builds, together, may not pass MAX_BUILT_CHARS (`spend`): else 4,000
  `{% set aN = s ~ N %}` lines, each value within the limit, keep gigabytes alive.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Iterator, Mapping
from string import Formatter
from typing import Any

from jinja2.utils import Namespace, generate_lorem_ipsum

from edgelm_runtime.errors import TemplateError

MAX_RENDER_SECONDS = 1.0      # a real chat template renders in well under a millisecond
MAX_RENDER_CHARS = 1 << 20    # 1 Mi characters of prompt text: far more than any edge context window
MAX_INT_BITS = 1 << 16        # largest integer a template computes with (~19,700 digits)
MAX_BUILT_CHARS = 32 * MAX_RENDER_CHARS  # all the values one render builds (each in limit, many kept alive)
MAX_CALL_DEPTH = 32           # macros calling macros (recursive schema printers nest ~10)
MAX_TEMPLATE_CHARS = 1 << 17  # template source (compiling is linear, ~1 s for this); real ones are < 20 KB
_HINT = "the template is hostile or broken; fix it or rebuild the bundle"


class RenderLimitError(TemplateError):
    """A template went past a render limit (time, size)."""


def too_big(what: str) -> RenderLimitError:
    return RenderLimitError(f"the chat template {what} (limit {MAX_RENDER_CHARS} characters)", hint=_HINT)


def _int_too_big(what: str, bits: int) -> RenderLimitError:
    return RenderLimitError(f"the chat template {what} a {bits}-bit integer (limit {MAX_INT_BITS} bits)", hint=_HINT)


# -- time ----------------------------------------------------------------------------------------

_state = threading.local()


def tick() -> None:
    """Raise once this thread's render deadline has passed (no-op outside a render)."""
    end = getattr(_state, "end", None)
    if end is not None and time.perf_counter() > end:
        raise RenderLimitError(f"{_state.name}: the chat template ran longer than {_state.seconds:g} s",
                               hint="the template loops (too long or forever); fix it or rebuild the bundle")


def spend(size: int) -> None:
    """Count `size` more characters built by this thread's render (no-op outside a render)."""
    built = getattr(_state, "built", None)
    if built is not None:
        _state.built = built = built + size
        if built > MAX_BUILT_CHARS:
            raise RenderLimitError(f"the chat template builds more than {MAX_BUILT_CHARS} characters in all",
                                   hint=_HINT)


def shallow_size(value: Any) -> int:
    """What building `value` allocated, about: characters, or slots of a container (its items exist)."""
    if isinstance(value, (str, bytes, list, tuple, dict, set, frozenset)):
        return len(value)
    return value.bit_length() // 8 if isinstance(value, int) else 1


_KEYS = ("end", "name", "seconds", "depth", "built")


@contextlib.contextmanager
def render_deadline(name: str, seconds: float = MAX_RENDER_SECONDS) -> Iterator[None]:
    """Make `tick()` raise once `seconds` have passed, and start counting `spend` (this thread only; nests)."""
    saved = tuple(getattr(_state, key, None) for key in _KEYS)
    _state.end, _state.name, _state.seconds, _state.depth, _state.built = \
        time.perf_counter() + seconds, name, seconds, 0, 0
    try:
        yield
    finally:
        for key, value in zip(_KEYS, saved):
            setattr(_state, key, value)


def enter_call() -> int:
    """Count one more nested call (macros, caller(), recursive loops); returns the depth to restore."""
    depth = getattr(_state, "depth", None) or 0
    if depth >= MAX_CALL_DEPTH:
        raise RenderLimitError(f"the chat template nests calls more than {MAX_CALL_DEPTH} deep",
                               hint="the template recurses (too deep or forever); fix it or rebuild the bundle")
    _state.depth = depth + 1
    return depth


def leave_call(depth: int) -> None:
    _state.depth = depth


def ticking(iterable: Any) -> Any:
    """A for-loop's iterable, checking the deadline on every item (keeps len() for loop.length)."""
    return _Ticking(iterable)


class _Ticking:
    __slots__ = ("_iterable",)

    def __init__(self, iterable: Any) -> None:
        self._iterable = iterable

    def __iter__(self) -> Iterator[Any]:
        for item in self._iterable:
            tick()
            yield item

    def __len__(self) -> int:
        return len(self._iterable)


# -- size ----------------------------------------------------------------------------------------

_VIEWS = (type({}.keys()), type({}.values()), type({}.items()))
_COLLECTIONS = (list, tuple, set, frozenset, *_VIEWS)


def measure(value: Any, budget: int = MAX_RENDER_CHARS, per_item: int = 0, per_level: int = 0) -> int:
    """About how many characters `value` prints as; stops once past `budget` (so costs O(budget) at
    most). per_item: extra characters per element (JSON separators); per_level: extra characters per
    element and nesting level (JSON indentation)."""
    if isinstance(value, (str, bytes)):
        return len(value)
    total, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (str, bytes)):
            total += len(item)
        elif isinstance(item, int):
            total += item.bit_length() // 3 + 1
        else:
            if isinstance(item, Namespace):
                item = object.__getattribute__(item, "_Namespace__attrs")
            if isinstance(item, dict):
                children: Any = [*item.keys(), *item.values()]
            elif isinstance(item, _COLLECTIONS):
                children = item
            else:
                total += 24 if isinstance(item, float) else 1
                continue
            total += 2 + len(item) * (2 + per_item + per_level * depth)
            if total > budget:
                return total
            for child in children:  # scalars counted here: no stack entry per element
                kind = type(child)
                if kind is str or kind is bytes:
                    total += len(child)
                elif kind is int or kind is bool:
                    total += 4 if -1000 < child < 10000 else child.bit_length() // 3 + 1
                elif kind is float or child is None:
                    total += 24 if kind is float else 1
                else:
                    stack.append((child, depth + 1))
        if total > budget:
            return total
    return total


def checked(value: Any, what: str = "builds a value past the size limit") -> Any:
    """`value` if it is within the limits (an iterator: checked item by item as it is consumed)."""
    if type(value) is str:
        if len(value) > MAX_RENDER_CHARS:
            raise too_big(what)
        spend(len(value))
        return value
    if isinstance(value, int):
        if value.bit_length() > MAX_INT_BITS:
            raise _int_too_big("builds", value.bit_length())
        return value
    if isinstance(value, Iterator) and not isinstance(value, (str, bytes)):
        return _checked_items(value, what)
    if measure(value) > MAX_RENDER_CHARS:
        raise too_big(what)
    spend(shallow_size(value))
    return value


def _checked_items(iterator: Iterator[Any], what: str) -> Iterator[Any]:
    for item in iterator:
        tick()
        yield checked(item, what)


def check_int_args(values: Any) -> None:
    """An int argument over the size limit (center(10**9), indent(10**9), ...) is a bomb, not a width."""
    for value in values:
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_RENDER_CHARS:
            shown = value if value.bit_length() < 64 else f"a {value.bit_length()}-bit integer"
            raise too_big(f"passes {shown} as an argument")


def check_binop(operator: str, left: Any, right: Any) -> bool:
    """Size an operator's result from its operands, before Python computes it; True when that sized
    the whole result (no need to measure it again)."""
    if isinstance(left, int) and isinstance(right, int):
        a, b = left.bit_length(), right.bit_length()
        if operator == "**":
            bits = (a - 1) * right + 1 if right > 0 and abs(left) > 1 else 1  # within 2x of the result's
            if bits > MAX_INT_BITS:
                raise RenderLimitError(f"the chat template raises to the power {right if b < 64 else f'of a {b}-bit integer'} "
                                       f"(result over {MAX_INT_BITS} bits)", hint=_HINT)
        elif (a + b if operator == "*" else max(a, b)) > MAX_INT_BITS:
            raise _int_too_big("computes with", max(a + b if operator == "*" else max(a, b), MAX_INT_BITS + 1))
        return True
    if operator == "*":
        sequence, count = (left, right) if isinstance(right, int) else (right, left)
        if isinstance(count, int) and isinstance(sequence, (str, bytes, list, tuple)):
            if count > 0 and measure(sequence, MAX_RENDER_CHARS // count + 1) > MAX_RENDER_CHARS // count:
                raise too_big("repeats a value past the size limit")
            return True
    elif operator == "+" and isinstance(left, (str, bytes, list, tuple)):
        size = measure(left)
        if size + measure(right, MAX_RENDER_CHARS - size) > MAX_RENDER_CHARS:
            raise too_big("concatenates past the size limit")
        return True
    elif operator == "%" and isinstance(left, (str, bytes)):
        if percent_size(left, right) > MAX_RENDER_CHARS:
            raise too_big("formats a string past the size limit")
    return False


_PERCENT = re.compile(r"%(?:\(([^)]*)\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d*))?[hlL]?(.?)", re.S)


def percent_size(fmt: str | bytes, args: Any) -> int:
    """Characters `fmt % args` can produce: the text, every width and precision, the arguments."""
    text = fmt.decode("latin-1") if isinstance(fmt, bytes) else str(fmt)
    mapping = args if isinstance(args, Mapping) else None
    values = args if isinstance(args, tuple) else (args,)
    size, position = len(text) + (0 if mapping is not None else measure(values)), 0
    for key, width, precision, kind in _PERCENT.findall(text):
        if kind == "%":
            continue
        widest = 0
        for part in (width, precision):
            if part == "*":
                star = values[position] if position < len(values) else 0
                position += 1
                widest = max(widest, star if isinstance(star, int) else 0)
            elif part:
                widest = max(widest, int(part) if len(part) < 10 else MAX_RENDER_CHARS + 1)
        position += 1
        size += widest + (measure(mapping.get(key)) if mapping is not None and key in mapping else 0)
    return size


def _spec_width(spec: str) -> int:
    digits = re.findall(r"\d+", spec)
    return max((int(d) if len(d) < 10 else MAX_RENDER_CHARS + 1 for d in digits), default=0)


class BoundedFormatterMixin(Formatter):
    """str.format / format_map with every field's width and the running result sized first
    (`'{:>999999999}'.format(1)`, `'{:{}}'.format(1, '>999999999')`, `'{0}{0}{0}'.format(s)`)."""

    def vformat(self, format_string: str, args: Any, kwargs: Any) -> str:
        self._size = len(format_string)
        return super().vformat(format_string, args, kwargs)

    def format_field(self, value: Any, format_spec: str) -> Any:
        tick()
        width = _spec_width(format_spec)
        if width > MAX_RENDER_CHARS:
            raise too_big("formats with a huge width")
        self._size += max(width, measure(value))
        if self._size > MAX_RENDER_CHARS:
            raise too_big("formats a string past the size limit")
        return super().format_field(value, format_spec)


def _join_size(separator: Any, items: list[Any]) -> int:
    size = len(separator) * max(len(items) - 1, 0)
    for item in items:
        if size > MAX_RENDER_CHARS:
            break
        size += measure(item)
    return size


def _replace_size(text: Any, old: Any, new: Any, count: Any) -> int:
    try:
        occurrences = text.count(old) if len(old) else len(text) + 1
    except TypeError:
        return 0  # the call itself raises
    if isinstance(count, int) and count >= 0:
        occurrences = min(occurrences, count)
    return len(text) + occurrences * max(measure(new) - len(old), 0)


def _translate_factor(table: Any) -> int:
    if isinstance(table, (str, bytes)):
        return 1
    values = table.values() if isinstance(table, Mapping) else table if isinstance(table, (list, tuple)) else None
    if values is None:
        return MAX_RENDER_CHARS + 1  # some other lookup object: refused, it could map a char to anything
    return max((len(v) if isinstance(v, (str, bytes)) else 1 for v in values), default=1)


def check_method(owner: str | bytes, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """Size a str/bytes method call that can grow its result (join, expandtabs, replace, translate);
    returns the args to call with (join's iterable read into a list, so it is sized first)."""
    def arg(index: int, key: str, default: Any) -> Any:
        return args[index] if len(args) > index else kwargs.get(key, default)

    if name == "join" and args:
        args = (list(args[0]), *args[1:])
        size = _join_size(owner, args[0])
    elif name == "expandtabs":
        tabsize = arg(0, "tabsize", 8)
        size = len(owner) + owner.count("\t" if isinstance(owner, str) else b"\t") * max(tabsize, 0) \
            if isinstance(tabsize, int) else 0
    elif name == "replace" and len(args) >= 2:
        size = _replace_size(owner, args[0], args[1], arg(2, "count", -1))
    elif name == "translate" and args:
        size = len(owner) * _translate_factor(args[0])
    else:
        return args
    if size > MAX_RENDER_CHARS:
        raise too_big(f"calls {name}() past the size limit")
    return args


def check_lipsum(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    def arg(index: int, key: str, default: Any) -> Any:
        return args[index] if len(args) > index else kwargs.get(key, default)

    paragraphs, most = arg(0, "n", 5), arg(3, "max", 100)
    if isinstance(paragraphs, int) and isinstance(most, int) and paragraphs * max(most, 1) * 12 > MAX_RENDER_CHARS:
        raise too_big("asks lipsum() for too much text")


def is_lipsum(function: Any) -> bool:
    return function is generate_lorem_ipsum
