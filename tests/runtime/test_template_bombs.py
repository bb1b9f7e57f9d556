"""Hostile chat templates stop at the render limits, fast and without big allocations; real
templates render exactly as jinja2's plain sandbox (configured like transformers) renders them.

Each bomb would run for minutes or allocate gigabytes without the limits (most in one C call,
which no deadline can interrupt), so each must raise a TemplateError within about the deadline,
with a small tracemalloc peak. The address space is capped meanwhile, so a regression fails the
test (an allocation refused shows as "exhausted memory") instead of swapping the machine."""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import sys
import threading
import time
import tracemalloc
from collections.abc import Iterator
from datetime import datetime

import pytest
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

import edgelm_runtime as er
from edgelm_runtime.templates import CHATML_TEMPLATE, MAX_RENDER_SECONDS, ChatTemplate, RenderLimitError

MESSAGES = [{"role": "user", "content": "hi"}]
S = "{% set s = 'x' * 1000000 %}"  # a value just under the size limit, which bombs then multiply

BOMBS = {
    # arithmetic: the exponent, the base and the operands all count
    "power": "{{ 9**99999 }}",
    "power-tower": "{{ ((2**4096)**4096)**256 }}",
    "int-squaring": "{% set ns = namespace(x=2**4000) %}{% for i in range(40) %}{% set ns.x = ns.x * ns.x %}{% endfor %}",
    "int-division": "{% set x = ('f' * 20000)|int(base=16) %}{{ x // (x - 12345) }}",
    "divisibleby": "{% set x = 7**20000 %}{{ (x * x) is divisibleby(x - 1) }}",
    "int-parse": "{{ ('9' * 1000000)|int }}",
    "repeat": "{{ 'x' * 10**9 }}",
    "int-times-str": "{{ 10**9 * 'x' }}",
    "list-repeat": "{{ ([[0]] * 1000000)|length }}",
    "shared-list-repeat": S + "{{ ([s] * 1000)|length }}",
    "doubling-concat": "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "doubling-plus": "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "doubling-list": "{% set ns = namespace(l=[1]) %}{% for i in range(60) %}{% set ns.l = ns.l + ns.l %}{% endfor %}",
    "literal-nesting": S + "{% set a = [s, s, s, s] %}{% set b = [a, a, a, a] %}{% set c = [b, b, b, b] %}{{ [c, c, c, c] }}",
    "dict-literal": S + "{{ {'a': s, 'b': s} }}",
    "fromkeys": S + "{{ {}.fromkeys(range(100000), s) }}",
    # str and bytes methods
    "expandtabs": "{{ ('\\t' * 3000).expandtabs(999999) }}",
    "bytes-expandtabs": "{{ ('\\t' * 3000).encode().expandtabs(999999) }}",
    "join-method": "{{ ('x' * 10**6).join(['a', 'b'] * 3000) }}",
    "replace-method": "{{ ('x' * 1000).replace('', 'y' * 100000) }}",
    "translate": S + "{{ ('x' * 1000).translate({120: s}) }}",
    "center-method": "{{ 'x'.center(1000000000) }}",
    "ljust-method": "{{ 'x'.ljust(1000000000) }}",
    "zfill-method": "{{ '1'.zfill(1000000000) }}",
    "to-bytes": "{{ (1).to_bytes(1000000000, 'big') }}",
    # formatting
    "format-width": "{{ '{:>999999999}'.format(1) }}",
    "format-nested-width": "{{ '{:{}}'.format('x', '>999999999') }}",
    "format-repeat": S + "{{ ('{0}' * 1000).format(s) }}",
    "format-map": S + "{{ ('{a}' * 1000).format_map({'a': s}) }}",
    "percent-width": "{{ '%999999999s' % 'x' }}",
    "percent-int-width": "{{ '%999999999d' % 1 }}",
    "percent-star": "{{ '%*d' % (999999999, 1) }}",
    "percent-precision": "{{ '%.999999999f' % 1.0 }}",
    "percent-repeat": S + "{{ ('%(a)s' * 1000) % {'a': s} }}",
    "percent-many-widths": "{{ ('%999999d' * 1000) % ((1,) * 1000) }}",
    "format-filter": "{{ '%999999999s'|format('x') }}",
    "strftime": "{{ strftime_now('%c' * 500000) }}",
    # filters
    "join": S + "{{ ([s] * 1000)|join }}",
    "join-separator": "{{ (range(100000)|list)|join('x' * 1000000) }}",
    "join-attribute": S + "{{ ([{'a': s}] * 1)|join(attribute='a') ~ s }}",
    "center-filter": "{{ 'x'|center(1000000000) }}",
    "indent": "{{ ('\\n' * 100000)|indent(1000000) }}",
    "indent-string": "{{ ('\\n' * 100000)|indent(' ' * 1000000) }}",
    "wordwrap": "{{ ('a ' * 400000)|wordwrap(1, wrapstring='x' * 1000000) }}",
    "truncate": "{{ ('x' * 1000000)|truncate(999999, end='y' * 1000000) }}",
    "replace": "{% set ns = namespace(s='xx') %}{% for i in range(40) %}{% set ns.s = ns.s|replace('x', 'xxxx') %}{% endfor %}",
    "replace-empty": "{{ ('x' * 1000)|replace('', 'y' * 100000) }}",
    "batch-fill": S + "{% for b in [1]|batch(1000000, s) %}{{ b }}{% endfor %}",
    "slice-fill": S + "{% for b in range(100000)|slice(3, s) %}{{ b }}{% endfor %}",
    "sum-lists": "{% set l = [0] * 100 %}{{ ([l] * 3000)|sum(start=[]) }}",
    "tojson-indent": "{{ (range(100000)|list)|tojson(indent=1000000) }}",
    "tojson-separators": "{{ (range(100000)|list)|tojson(separators=('x' * 100000, ':')) }}",
    "pprint": S + "{{ [[[[[[[[[[s]]]]]]]]]]|pprint }}",
    "urlize": "{{ ('a.co ' * 100000)|urlize(target='x' * 100000) }}",
    "striptags": "{{ ('<a>x</a> ' * 100000)|striptags }}",
    "map-center": "{{ ['x']|map('center', 1000000000)|join }}",
    "lipsum": "{{ lipsum(100000, min=1000, max=1000) }}",
    # loops, recursion, blocks, output
    "nested-loops": "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
    "nested-loops-var": "{% set r = range(99999) %}{% for i in r %}{% for j in r %}{% for k in r %}"
                        "{% endfor %}{% endfor %}{% endfor %}",
    # each iteration drops a half-read generator: the trace function can fire inside its finalizer,
    # where CPython swallows the error and turns tracing off; the explicit checks still stop it
    "finalizer-loops": "{% for i in range(99999) %}{% for j in range(99999) %}{% set g = messages|map(attribute='role') %}"
                       "{{ (g|first)[:0] }}{% endfor %}{% endfor %}",
    "output": "{% for i in range(99999) %}{{ 'abcdefghijklmnopqrstuvwxyz' }}{% endfor %}",
    "recursion": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "branching-recursion": "{% macro f(n) %}{% if n < 30 %}{{ f(n + 1) }}{{ f(n + 1) }}{% endif %}{% endmacro %}{{ f(0) }}",
    "recursive-memory": "{% macro f(n, s) %}{{ f(n + 1, s[1:] ~ 'y') }}{% endmacro %}{{ f(0, 'x' * 1000000) }}",
    "recursive-loop": "{% for x in [[[]]] recursive %}{{ loop([x, x]) }}{% endfor %}",
    "macro-buffer": S + "{% macro m() %}{% for i in range(3000) %}{{ s }}{% endfor %}{% endmacro %}{% set y = m() %}",
    "set-block": S + "{% set y %}{% for i in range(3000) %}{{ s }}{% endfor %}{% endset %}",
    "filter-block": S + "{% filter upper %}{% for i in range(3000) %}{{ s }}{% endfor %}{% endfilter %}",
    "namespace-attrs": S + "{% set ns = namespace(a=s) %}{% set ns.b = s %}{{ ns }}",
    # each value within the limit, but thousands of them alive at once (1.4 GB in a second, unchecked)
    "many-variables": S + "".join(f"{{% set a{i} = s ~ {i} %}}" for i in range(4000)),
    "many-arguments": S + "{% macro f() %}{% endmacro %}{{ f(" + ", ".join(f"s ~ {i}" for i in range(3000)) + ") }}",
}
# single C-level calls: no deadline can stop these, so they must be refused by size, at once
SIZED_UP_FRONT = ["power-tower", "repeat", "expandtabs", "join-method", "format-width", "percent-width",
                  "tojson-indent", "pprint", "indent", "sum-lists", "striptags"]


@contextlib.contextmanager
def address_space_cap(extra: int = 1 << 30) -> Iterator[None]:
    """Cap this process's address space at its current size + `extra` (Linux; no-op elsewhere)."""
    try:
        with open("/proc/self/status") as status:
            size = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    except (OSError, StopIteration, ValueError):
        yield
        return
    cap = size + extra if hard == resource.RLIM_INFINITY else min(size + extra, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _render_bomb(name: str) -> tuple[er.TemplateError, float, int]:
    """The error, seconds and peak bytes of rendering bomb `name` (compiling is bounded by the source size)."""
    template = ChatTemplate(BOMBS[name], f"{name}.jinja")
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with address_space_cap(), pytest.raises(er.TemplateError) as caught:
            template.render(MESSAGES)
        return caught.value, time.perf_counter() - started, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("name", list(BOMBS))
def test_bombs_stop_fast_and_small(name: str) -> None:
    error, elapsed, peak = _render_bomb(name)
    assert error.message.startswith(f"{name}.jinja: the chat template "), error.message
    assert "exhausted memory" not in error.message  # an allocation past the address-space cap: not sized first
    assert elapsed < MAX_RENDER_SECONDS + 2.0, f"{elapsed:.1f} s"
    assert peak < 200e6, f"{peak / 1e6:.0f} MB"


@pytest.mark.parametrize("name", SIZED_UP_FRONT)
def test_single_c_calls_are_refused_by_size_not_time(name: str) -> None:
    error, elapsed, _ = _render_bomb(name)
    assert isinstance(error, RenderLimitError) and "ran longer" not in error.message, error.message
    assert elapsed < 0.5 * MAX_RENDER_SECONDS


def test_deadline_needs_no_trace_function() -> None:
    """The deadline is checked explicitly, not by sys.settrace (which CPython drops after it raises in a
    finalizer, and which would stop a debugger's or coverage's tracer): a tracer in place stays in place,
    and a template that gets tracing turned off still stops."""
    def tracer(frame, event, arg):
        return None

    seen = []
    template = ChatTemplate("{{ probe() }}" + BOMBS["nested-loops-var"], "untraced.jinja")
    template._template.globals["probe"] = lambda: seen.append(sys.gettrace()) or sys.settrace(None) or ""
    sys.settrace(tracer)
    started = time.perf_counter()
    try:
        with pytest.raises(RenderLimitError, match=r"^untraced\.jinja: the chat template ran longer than"):
            template.render(MESSAGES)
    finally:
        sys.settrace(None)
    assert time.perf_counter() - started < MAX_RENDER_SECONDS + 2.0
    assert seen == [tracer]


def test_deadline_holds_in_worker_threads() -> None:
    """The server renders through asyncio.to_thread: each thread has its own deadline, and a bomb
    in one does not cut short an ordinary render in another."""
    bomb = ChatTemplate(BOMBS["nested-loops-var"], "bomb.jinja")
    ordinary = ChatTemplate(CHATML_TEMPLATE, "chatml")
    results: list[str] = []
    stop = threading.Event()

    def keep_rendering() -> None:
        while not stop.is_set():
            results.append(ordinary.render(MESSAGES))

    neighbour = threading.Thread(target=keep_rendering)
    neighbour.start()
    started = time.perf_counter()
    try:
        with pytest.raises(RenderLimitError, match=r"^bomb\.jinja: the chat template ran longer than"):
            asyncio.run(asyncio.to_thread(bomb.render, MESSAGES))
    finally:
        stop.set()
        neighbour.join()
    assert time.perf_counter() - started < MAX_RENDER_SECONDS + 2.0
    assert results and set(results) == {"<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"}


def test_oversized_source_is_refused_before_compiling() -> None:
    with pytest.raises(RenderLimitError, match=r"^big\.jinja: the chat template is \d+ characters long"):
        ChatTemplate("x" * 200_000, "big.jinja")


@pytest.mark.parametrize("source", ["{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}", "{{ " + "9" * 5000 + " }}",
                                    "{% for i in [1] %}" * 30 + "x" + "{% endfor %}" * 30])
def test_sources_that_break_the_compiler_are_template_errors(source: str) -> None:
    with pytest.raises(er.TemplateError, match=r"^deep\.jinja: the chat template does not compile"):
        ChatTemplate(source, "deep.jinja")


# -- real templates render unchanged ---------------------------------------------------------------

LLAMA3 = """{{- bos_token }}
{%- if custom_tools is defined %}{%- set tools = custom_tools %}{%- endif %}
{%- if not tools_in_user_message is defined %}{%- set tools_in_user_message = true %}{%- endif %}
{%- if not date_string is defined %}{%- set date_string = "26 Jul 2024" %}{%- endif %}
{%- if not tools is defined %}{%- set tools = none %}{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}{{- "Environment: ipython\\n" }}{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- if tools_in_user_message and not tools is none %}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
    {%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- 'with its proper arguments that best answers the given prompt.\\n\\n' }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}
{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

QWEN = """{%- macro render_content(content) %}
    {%- if content is string %}{{- content }}
    {%- elif content is iterable %}{%- for item in content %}{%- if item.type == 'text' %}{{- item.text }}{%- endif %}{%- endfor %}
    {%- endif %}
{%- endmacro %}
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}{{- render_content(messages[0].content) + '\\n\\n' }}{%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n<tools>" }}
    {%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object within <tool_call></tool_call> XML tags.<|im_end|>\\n" }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + render_content(messages[0].content) + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string
          and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- set content = render_content(message.content) %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if '</think>' in content %}
            {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}
            {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}{{- '\\n' }}{%- endif %}
                {%- if tool_call.function %}{%- set tool_call = tool_call.function %}{%- endif %}
                {{- '<tool_call>\\n{"name": "' }}{{- tool_call.name }}{{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}{{- tool_call.arguments }}{%- else %}{{- tool_call.arguments | tojson }}{%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}{{- '<|im_start|>user' }}{%- endif %}
        {{- '\\n<tool_response>\\n' + content + '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}{{- '<|im_end|>\\n' }}{%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""

# the operators, methods and filters the limits wrap, used as ordinary templates use them
FEATURES = """{%- set a, b = 1, (2, 3) %}{%- set pairs = [('x', 1), ('y', 2)] %}
{%- for k, v in pairs %}{{ '%s=%d;' % (k, v) }}{{ '{}:{:>3}|'.format(k, v) }}{{ '{a}'.format_map({'a': k}) }}{% endfor %}
{{ messages|map(attribute='role')|join(', ') }}|{{ messages|selectattr('role', 'eq', 'user')|list|length }}
{{ (messages|map(attribute='content')|map('length')|sum) }}|{{ [1, 2, 3]|sum(start=10) }}|{{ 2 ** 10 }}|{{ 7 // 2 }}|{{ -a }}
{{ 'abc'|center(9)|replace('b', 'B') }}|{{ 'one two three'|wordwrap(5) }}|{{ 'a\\nb'|indent(2, first=true) }}
{{ 'x' * 3 ~ 'y' }}|{{ [1] * 3 + [b] }}|{{ {'k': [1, 2]}|tojson }}|{{ {'k': 1}|tojson(indent=2) }}|{{ 'T\\tab'.expandtabs(4) }}
{{ '-'.join(['a', 'b']) }}|{{ 'aXa'.replace('a', 'bb') }}|{{ range(5)|batch(2)|list }}|{{ range(5)|slice(2)|list }}
{{ '12'|int + '0x1f'|int(base=16) }}|{{ 'long text here'|truncate(9, leeway=0) }}|{{ '%-5s|' % 'ab' }}{{ 'ab'.zfill(4) }}
{{ [3, 1, 2]|sort|first }}{{ [1, 1, 2]|unique|list }}{{ 15 is divisibleby 5 }}{{ b|pprint }}{{ {'a': 1}|dictsort }}
{%- set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + loop.index %}{% endfor %}{{ ns.n }}
{%- macro tree(node) %}[{% for child in node %}{{ tree(child) }}{% endfor %}]{% endmacro %}{{ tree([[], [[]]]) }}
{%- for x in [[1, [2]], [3]] recursive %}<{{ x if x is number else loop(x) }}>{% endfor %}
{%- for m in messages if m.role != 'system' %}{% if loop.last %}{{ loop.length }}{% break %}{% endif %}{% endfor %}
{%- generation %}{{ eos_token }}{% endgeneration %}"""

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CONVERSATIONS = {
    "simple": [{"role": "user", "content": "What is 2+2?"}],
    "system": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
               {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}],
    "tools": [{"role": "user", "content": "Weather in Paris?"},
              {"role": "assistant", "content": "", "tool_calls": [
                  {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
              {"role": "tool", "content": "18 C, sunny"}],
    "thinking": [{"role": "user", "content": "Sum 1..3"},
                 {"role": "assistant", "content": "<think>\n1+2+3</think>\n\n6"}, {"role": "user", "content": "Thanks, ünïcode ✓"}],
    "long": [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} " + "word " * 500} for i in range(40)],
}


def _reference(source: str) -> ImmutableSandboxedEnvironment:
    """jinja2's plain sandbox as transformers sets it up, without any of edgelm's limits."""
    from jinja2 import nodes
    from jinja2.ext import Extension

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise er.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env.from_string(source)


@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("name, source", [pytest.param(name, source, id=name) for name, source in
                                          [("chatml", CHATML_TEMPLATE), ("llama3", LLAMA3), ("qwen", QWEN),
                                           ("features", FEATURES)]])
@pytest.mark.parametrize("with_tools", [False, True])
def test_real_templates_render_as_plain_jinja_does(name: str, source: str, conversation: str, with_tools: bool) -> None:
    messages = CONVERSATIONS[conversation]
    if conversation == "tools" and name in ("chatml", "features"):
        messages = [m for m in messages if m["role"] != "tool" and not m.get("tool_calls")] or messages[:1]
    tools = TOOLS if with_tools else None
    template = ChatTemplate(source, f"{name}.jinja", bos_token="<s>", eos_token="</s>")
    expected = _reference(source).render(messages=messages, tools=tools, documents=None, add_generation_prompt=True,
                                         bos_token="<s>", eos_token="</s>")
    assert template.render(messages, tools=tools) == expected
    assert template.render(messages, add_generation_prompt=False, tools=tools) == _reference(source).render(
        messages=messages, tools=tools, documents=None, add_generation_prompt=False, bos_token="<s>", eos_token="</s>")


def test_known_prompts_render_exactly() -> None:
    """Spelled out, in case the reference environment and the runtime ever drift the same way."""
    llama = ChatTemplate(LLAMA3, "llama3.jinja", bos_token="<|begin_of_text|>").render(CONVERSATIONS["system"][:2])
    assert llama == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
                     "Today Date: 26 Jul 2024\n\nYou are terse.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi"
                     "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    qwen = ChatTemplate(QWEN, "qwen.jinja").render(CONVERSATIONS["thinking"])
    assert qwen == ("<|im_start|>user\nSum 1..3<|im_end|>\n<|im_start|>assistant\n6<|im_end|>\n"
                    "<|im_start|>user\nThanks, ünïcode ✓<|im_end|>\n<|im_start|>assistant\n")
    tools = ChatTemplate(QWEN, "qwen.jinja").render(CONVERSATIONS["tools"], tools=TOOLS)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in tools
    assert "<tool_response>\n18 C, sunny\n</tool_response><|im_end|>" in tools


@pytest.mark.parametrize("source", [CHATML_TEMPLATE, LLAMA3, QWEN], ids=["chatml", "llama3", "qwen"])
def test_conversations_near_the_output_limit_still_render(source: str) -> None:
    """~960k characters of conversation: under every limit (the values built total ~4M of 32M)."""
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": "w " * 12000} for i in range(40)]
    assert len(ChatTemplate(source, "big.jinja").render(messages, tools=TOOLS)) > 950_000


def test_ordinary_renders_are_not_slowed_into_the_deadline() -> None:
    template = ChatTemplate(QWEN, "qwen.jinja")
    started = time.perf_counter()
    for _ in range(20):
        template.render(CONVERSATIONS["long"], tools=TOOLS)
    assert (time.perf_counter() - started) / 20 < 0.1 * MAX_RENDER_SECONDS
