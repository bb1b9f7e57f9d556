"""Cost of the chat-template render limits: a bundle's template rendered with edgelm's bounded
sandbox (deadline trace, output and size checks) against jinja2's plain immutable sandbox.

    python benchmarks/template_render.py dist/smollm2-int8 [--messages 21] [--repeats 200]
"""

from __future__ import annotations

import argparse
import statistics
import time

import edgelm_runtime as er
from jinja2.sandbox import ImmutableSandboxedEnvironment


def per_render_us(render, repeats: int) -> float:
    for _ in range(3):
        render()
    samples = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(repeats):
            render()
        samples.append((time.perf_counter() - started) / repeats * 1e6)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle")
    parser.add_argument("--messages", type=int, default=21)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    llm = er.load_bundle(args.bundle)
    template = llm._chat_template
    messages = [{"role": "system", "content": "You are helpful."}] + [
        {"role": "user" if i % 2 == 0 else "assistant", "content": "hello there " * 20} for i in range(args.messages - 1)]
    plain = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template.source)
    bounded = per_render_us(lambda: template.render(messages), args.repeats)
    unbounded = per_render_us(lambda: plain.render(messages=messages, add_generation_prompt=True, bos_token="",
                                                   eos_token=""), args.repeats)
    print(f"{args.messages} messages: bounded {bounded:.0f} us, plain sandbox {unbounded:.0f} us per render "
          f"(medians of 5 x {args.repeats})")


if __name__ == "__main__":
    main()
