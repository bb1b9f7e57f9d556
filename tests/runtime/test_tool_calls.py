"""Reading tool calls out of a reply, and what a template without tool support is given instead."""

from __future__ import annotations

import json

from edgelm_runtime.sampling import Sampler, SamplingParams
from edgelm_runtime.tool_calls import CallDetector, call_grammar, history_for_template, parse_tool_calls, \
    template_syntax, with_tool_prompt

TOOLS = [{"type": "function", "function": {"name": "add", "description": "", "parameters": {"type": "object"}}}]


def test_hermes_blocks_become_calls_and_the_rest_stays_content():
    text = 'Let me add.\n<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>'
    content, calls = parse_tool_calls(text, TOOLS, "hermes")
    assert content == "Let me add." and [(c.name, json.loads(c.arguments)) for c in calls] == [("add", {"a": 1})]
    # an unknown function or a block that is not JSON is not a call: the text is returned whole
    for bad in ('<tool_call>{"name": "rm", "arguments": {}}</tool_call>', "<tool_call>{oops</tool_call>", "plain"):
        assert parse_tool_calls(bad, TOOLS, "hermes") == (bad, [])
    # a reply cut inside its last block still yields the complete ones before it
    cut = '<tool_call>{"name": "add", "arguments": {}}</tool_call>\n<tool_call>{"name": "ad'
    assert len(parse_tool_calls(cut, TOOLS, "hermes")[1]) == 1


def test_a_llama3_reply_that_is_one_json_object_is_a_call():
    content, calls = parse_tool_calls(' {"name": "add", "parameters": {"b": 2}}', TOOLS, "llama3")
    assert content is None and json.loads(calls[0].arguments) == {"b": 2}
    tpl = "{% if tools %}Environment: ipython{% endif %}{{ messages }}"
    assert template_syntax(tpl) == (True, "llama3")
    assert template_syntax("{% for tool in tools %}<tool_call>{% endfor %}") == (True, "hermes")
    assert template_syntax("{{ messages[0]['content'] }}") == (False, "hermes")


def test_the_stream_detector_never_leaks_part_of_a_call_as_content():
    detector = CallDetector("hermes")
    out = "".join(detector.push(p) for p in ["Sure", " <tool", "_ca", "ll>\n{", '"name"'])
    assert out == "Sure " and detector.in_call and detector.flush() == ""
    plain = CallDetector("hermes")
    assert "".join(plain.push(p) for p in ["a <to", "day"]) + plain.flush() == "a <today"


def test_templates_without_tools_get_the_default_prompt_and_rewritten_history():
    messages = with_tool_prompt([{"role": "user", "content": "2+2?"}], TOOLS)
    assert messages[0]["role"] == "system" and '"name": "add"' in messages[0]["content"]
    history = history_for_template([
        {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function",
                                                            "function": {"name": "add", "arguments": '{"a": 2}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "4"}], native=False)
    assert history[0] == {"role": "assistant", "content": '<tool_call>\n{"name": "add", "arguments": {"a": 2}}\n</tool_call>'}
    assert history[1] == {"role": "user", "content": "<tool_response>\n4\n</tool_response>"}
    native = history_for_template([{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2}'}}]}], native=True)
    assert native[0]["tool_calls"][0]["function"]["arguments"] == {"a": 2}  # transformers templates take objects


def test_a_repeated_call_is_detected_when_its_block_closes():
    from edgelm_runtime.tool_calls import repeats_a_call

    one = '<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>'
    assert not repeats_a_call(one) and not repeats_a_call(one + "\n" + one.replace("1", "2"))
    assert repeats_a_call(one + "\n" + one.replace(": ", ":"))  # the same JSON, spaced otherwise
    assert not repeats_a_call(one + "\n" + one[:-5])  # the second block is not closed yet


def test_the_call_grammar_names_only_declared_functions():
    grammar = call_grammar(TOOLS, parallel=False)
    assert grammar.startswith("start: call\n") and '"const": "add"' in grammar
    assert call_grammar(TOOLS, parallel=True).startswith('start: call ("\\n" call)*')


def test_presence_and_frequency_penalties_subtract_from_generated_tokens():
    logits = [2.0, 1.9, 0.0]
    counts = [0.0, 0.0, 0.0]
    import numpy as np

    sampler = Sampler(SamplingParams(frequency_penalty=0.5, presence_penalty=0.3))
    assert sampler.sample(np.array(logits), None, np.array(counts)) == 0
    # token 0 generated once: 2.0 - 0.5 - 0.3 = 1.2 < 1.9
    assert sampler.sample(np.array(logits), None, np.array([1.0, 0.0, 0.0])) == 1
    assert Sampler(SamplingParams()).sample(np.array(logits), None, np.array([5.0, 0, 0])) == 0  # off: ignored


HERMES_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools: {% for tool in tools %}{{ tool.function.name }} {% endfor %}"
    "Call with <tool_call>.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.tool_calls %}{% for c in m.tool_calls %}"
    "<tool_call>{{ c.function.name }} {{ c.function.arguments.a }}</tool_call>{% endfor %}"
    "{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}<|im_start|>assistant\n")


def test_a_template_with_tool_support_renders_the_tools_itself(llm):
    """No default tool prompt: the tools and the call history go to the template as transformers passes them."""
    import edgelm_runtime as er
    from edgelm_runtime.requests import prepare
    from edgelm_runtime.templates import ChatTemplate

    native = er.LanguageModel(llm.path, llm.manifest, llm.decoder, llm.tokenizer, ChatTemplate(HERMES_TEMPLATE, "hermes"))
    body = {"messages": [{"role": "user", "content": "add"},
                         {"role": "assistant", "content": None, "tool_calls": [
                             {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 7}'}}]},
                         {"role": "tool", "tool_call_id": "c1", "content": "7"}],
            "tools": TOOLS, "max_tokens": 4}
    prepared = prepare(json.dumps(body).encode(), True, native)
    prompt = llm.tokenizer.decode(prepared.ids, skip_special_tokens=False)
    assert prompt.startswith("<|im_start|>system\nTools: add Call with <tool_call>.")
    assert "<tool_call>add 7</tool_call>" in prompt and "You can call functions" not in prompt
    assert prepared.tool_syntax == "hermes" and prepared.tools.mode == "auto"
