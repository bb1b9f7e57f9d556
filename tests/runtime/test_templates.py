"""Chat templates render in a sandbox; every failure is a TemplateError naming the template."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

import edgelm_runtime as er
from edgelm_runtime.templates import CHATML_TEMPLATE, ChatTemplate

MESSAGES = [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize("source", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.system('echo owned') }}",
    "{% set _ = messages.append({'role': 'x'}) %}",
])
def test_sandbox_escapes_are_template_errors(source: str) -> None:
    with pytest.raises(er.TemplateError, match=r"^evil\.jinja: .*SecurityError"):
        ChatTemplate(source, "evil.jinja").render(MESSAGES)


def test_bundle_template_escape_names_the_file(bundle_copy: Path, edit_manifest: Callable) -> None:
    (bundle_copy / "templates").mkdir(exist_ok=True)
    (bundle_copy / "templates" / "chat.jinja").write_text("{{ ''.__class__.__mro__ }}", encoding="utf-8")
    edit_manifest(bundle_copy, lambda m: m.update(chat_template_file="templates/chat.jinja"), relist_files=True)
    llm = er.load_bundle(bundle_copy)
    with pytest.raises(er.TemplateError, match="chat.jinja"):
        llm.chat(MESSAGES, max_new_tokens=2)


def test_raise_exception_becomes_a_template_error() -> None:
    template = ChatTemplate("{{ raise_exception('only user and assistant roles') }}", "strict.jinja")
    with pytest.raises(er.TemplateError, match="^strict.jinja: only user and assistant roles"):
        template.render(MESSAGES)


def test_syntax_error_names_the_file_and_line() -> None:
    with pytest.raises(er.TemplateError, match=r"^broken\.jinja: .*line 2"):
        ChatTemplate("ok\n{% for m in messages %}", "broken.jinja")


def test_special_tokens_and_helpers_are_available() -> None:
    source = "{{ bos_token }}{{ messages[0]['content'] }}{{ eos_token }}|{{ strftime_now('%Y') | length }}"
    template = ChatTemplate(source, "t.jinja", bos_token="<s>", eos_token="</s>")
    assert template.render(MESSAGES) == "<s>Hi</s>|4"


def test_bundle_without_template_uses_chatml(bundle_copy: Path, edit_manifest: Callable) -> None:
    edit_manifest(bundle_copy, lambda m: m.update(chat_template_file=None))
    llm = er.load_bundle(bundle_copy)
    assert llm.render_chat(MESSAGES) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert llm.render_chat(MESSAGES, add_generation_prompt=False) == "<|im_start|>user\nHi<|im_end|>\n"
    assert ChatTemplate(CHATML_TEMPLATE, "x").render(MESSAGES) == llm.render_chat(MESSAGES)


def test_bundle_template_renders_the_conversation(llm: er.LanguageModel) -> None:
    messages = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
    assert "What is 2+2?" in llm.render_chat(messages)
    with_prompt = llm.render_chat(messages, add_generation_prompt=True)
    assert with_prompt != llm.render_chat(messages, add_generation_prompt=False)


@pytest.mark.parametrize("messages", [[], "Hi", [{"content": "no role"}]])
def test_malformed_messages_are_generation_errors(llm: er.LanguageModel, messages) -> None:
    with pytest.raises(er.GenerationError, match="messages"):
        llm.chat(messages)


# Exhaustion (loops, huge values): tests/runtime/test_template_bombs.py


def test_limits_leave_ordinary_templates_alone() -> None:
    source = ("{% for m in messages %}{{ '%-6s|' % m['role'] ~ '{:>3}'.format(loop.index) ~ m['content'] * 2 }}"
              "{% endfor %}{{ messages|map(attribute='role')|join(',')|center(20) }}{{ 2 ** 10 }}")
    assert ChatTemplate(source, "ok.jinja").render(MESSAGES) == "user  |  1HiHi" + "user".center(20) + "1024"


def test_long_conversation_still_renders() -> None:
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": "word " * 2000} for i in range(50)]
    assert len(ChatTemplate(CHATML_TEMPLATE, "chatml").render(messages)) > 50 * 10000


def test_prompt_template_format_specs_are_refused() -> None:
    from edgelm_runtime.prompts import PromptTemplate

    with pytest.raises(er.TemplateError, match="format spec or conversion"):
        PromptTemplate(name="bomb", kind="generate", template="{text:>999999999}")
