"""Build-time chat templates render through the runtime's limited sandbox, not transformers'
apply_chat_template: the same prompts for real templates, and one quick build error for a hostile one."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from edgelm.calibration import builtin_prompts, calibration_texts, chat_renderer, template_origin
from edgelm.errors import ModelLoadError
from tests.integration.test_cli import _assert_clean_error, _run

NESTED_LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
# tools/documents None and bos/eos tokens exactly as apply_chat_template passes them
PARITY_TEMPLATE = ("{{ bos_token }}{% if tools is none and documents is none %}[no tools]{% endif %}"
                   "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content | trim }}<|im_end|>\n{% endfor %}"
                   "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}{{ eos_token }}")


def _fake_tokenizer(folder: Path) -> SimpleNamespace:
    return SimpleNamespace(name_or_path=str(folder), bos_token="<s>", eos_token="</s>")


@pytest.mark.parametrize("template", ["conftest", PARITY_TEMPLATE])
def test_calibration_prompts_match_transformers(tiny_model_dir: Path, template: str) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    if template != "conftest":
        tokenizer.chat_template = template
    texts = calibration_texts("builtin", tokenizer, tokenizer.chat_template, samples=len(builtin_prompts()))
    expected = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                if i % 2 == 0 else p for i, p in enumerate(builtin_prompts())]
    assert texts == expected
    assert texts[0] != builtin_prompts()[0]  # the chat format really was applied


@pytest.mark.parametrize("source, message", [
    (NESTED_LOOPS, "the chat template ran longer than 1 s"),
    ("{{ ((2**4096)**4096)**256 }}", "the chat template raises to the power 4096"),
    ("{{ ('\\t' * 3000).expandtabs(999999) }}", "the chat template calls expandtabs() past the size limit"),
    ("{{ raise_exception('no system role') }}", "no system role"),
    ("{% for m in messages %}", "the chat template does not compile"),
])
def test_hostile_or_broken_templates_fail_in_one_line(tmp_path: Path, source: str, message: str) -> None:
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": source}))
    started = time.perf_counter()
    with pytest.raises(ModelLoadError) as caught:
        calibration_texts("builtin", _fake_tokenizer(tmp_path), source, samples=8)
    assert time.perf_counter() - started < 3.0
    assert caught.value.message.startswith(f"{tmp_path / 'tokenizer_config.json'} (chat_template): ")
    assert message in caught.value.message and "\n" not in caught.value.message
    assert "fix or remove it" in caught.value.hint


def test_template_origin_follows_transformers_precedence(tmp_path: Path) -> None:
    tokenizer = _fake_tokenizer(tmp_path)
    assert template_origin(tokenizer) == f"{tmp_path} (chat template)"  # e.g. a GGUF file's template
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    assert template_origin(tokenizer) == f"{tmp_path} (chat template)"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "x"}))
    assert template_origin(tokenizer) == f"{tmp_path / 'tokenizer_config.json'} (chat_template)"
    (tmp_path / "chat_template.jinja").write_text("x")
    assert template_origin(tokenizer) == str(tmp_path / "chat_template.jinja")


def test_renderer_uses_the_tokenizers_special_tokens(tmp_path: Path) -> None:
    render = chat_renderer(_fake_tokenizer(tmp_path), PARITY_TEMPLATE)
    assert render(" Hi ") == "<s>[no tools]<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n</s>"


def test_build_with_a_hostile_chat_template_fails_fast_in_one_line(tiny_model_dir: Path, tiny_recipe: Path,
                                                                   tmp_path: Path) -> None:
    """The probe's case: a nested range() in tokenizer_config.json hung a cpu-w8a8 build for minutes."""
    model = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    (model / "chat_template.jinja").unlink(missing_ok=True)  # transformers 5 saves it there; put it in the config
    config = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": NESTED_LOOPS}))
    started = time.perf_counter()
    result = _run("build", "--profile", "cpu-w8a8", "--model", str(model), "--recipe", str(tiny_recipe),
                  "-o", str(tmp_path / "out"))
    assert time.perf_counter() - started < 30
    _assert_clean_error(result, f"{model / 'tokenizer_config.json'} (chat_template): the chat template ran longer than 1 s",
                        "fix or remove it")
    assert not (tmp_path / "out").exists()
