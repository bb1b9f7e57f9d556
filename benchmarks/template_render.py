"""Cost of the chat-template render limits: each template rendered (and compiled) with edgelm's
bounded sandbox (deadline checks and trace, sized operators, methods, filters, literals, loops)
against jinja2's plain immutable sandbox configured the same way. Prints the host it ran on.

    python benchmarks/template_render.py                      # ChatML, Llama-3- and Qwen-style samples
    python benchmarks/template_render.py dist/smollm2-int8    # plus that bundle's own template
    python benchmarks/template_render.py --template chat.jinja [--messages 21] [--repeats 200]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from importlib.metadata import version
from pathlib import Path

from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

import edgelm_runtime as er
from edgelm_runtime.templates import CHATML_TEMPLATE, ChatTemplate

LLAMA3_STYLE = """{{- bos_token }}{%- if not tools is defined %}{%- set tools = none %}{%- endif %}
{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}{%- set messages = messages[1:] %}
{%- else %}{%- set system_message = "" %}{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}{%- if tools is not none %}{{- "Environment: ipython\\n" }}{%- endif %}
{{- "Today Date: 26 Jul 2024\\n\\n" }}{%- if tools is not none %}{%- for t in tools %}{{- t | tojson(indent=4) }}{{- "\\n\\n" }}{%- endfor %}{%- endif %}
{{- system_message }}{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}
"""

QWEN_STYLE = """{%- if tools %}{{- '<|im_start|>system\\n# Tools\\n\\n<tools>' }}
    {%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}{{- "\\n</tools><|im_end|>\\n" }}
{%- elif messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}{%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and not message.content.startswith('<tool_response>') %}
        {%- set ns.multi_step_tool = false %}{%- set ns.last_query_index = index %}{%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.role == "user" or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}{%- set content = message.content %}
        {%- if '</think>' in content %}{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def host() -> str:
    from edgelm_runtime.hardware import describe_host

    return f"{describe_host()}, jinja2 {version('jinja2')}"


def plain(source: str):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    return env.from_string(source)


def per_call_us(call, repeats: int) -> float:
    for _ in range(3):
        call()
    samples = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(repeats):
            call()
        samples.append((time.perf_counter() - started) / repeats * 1e6)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", nargs="?", help="also time this bundle's chat template")
    parser.add_argument("--template", action="append", default=[], help="also time this .jinja file (repeatable)")
    parser.add_argument("--messages", type=int, default=21)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    sources = {"chatml": CHATML_TEMPLATE, "llama3-style": LLAMA3_STYLE, "qwen-style": QWEN_STYLE}
    if args.bundle:
        sources[f"bundle {Path(args.bundle).name}"] = er.load_bundle(args.bundle)._chat_template.source
    sources.update({Path(path).name: Path(path).read_text(encoding="utf-8") for path in args.template})
    messages = [{"role": "system", "content": "You are helpful."}] + [
        {"role": "user" if i % 2 == 0 else "assistant", "content": "hello there " * 20} for i in range(args.messages - 1)]
    print(f"host: {host()}")
    print(f"{args.messages} messages, medians of 5 x {args.repeats} renders (compiles: 5 x 20)")
    for name, source in sources.items():
        tools = TOOLS if "{{" in source and "tools" in source else None
        template, reference = ChatTemplate(source, name), plain(source)
        assert template.render(messages, tools=tools) == reference.render(
            messages=messages, tools=tools, documents=None, add_generation_prompt=True, bos_token="", eos_token="")
        bounded = per_call_us(lambda: template.render(messages, tools=tools), args.repeats)
        unbounded = per_call_us(lambda: reference.render(messages=messages, tools=tools, documents=None,
                                                         add_generation_prompt=True, bos_token="", eos_token=""),
                                args.repeats)
        compile_bounded = per_call_us(lambda: ChatTemplate(source, name), 20) / 1000
        compile_plain = per_call_us(lambda: plain(source), 20) / 1000
        print(f"{name:>16}: render bounded {bounded:7.0f} us, plain sandbox {unbounded:7.0f} us "
              f"({bounded / unbounded:.2f}x); compile {compile_bounded:.1f} ms vs {compile_plain:.1f} ms")


if __name__ == "__main__":
    main()
