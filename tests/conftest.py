"""Shared fixtures: a tiny random Llama (hidden 64, 2 layers, GQA) with a real trained BPE
tokenizer and chat template, saved as safetensors, and bundles built from it once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TINY_RECIPE = """\
max_seq_len: 256
calibration: {samples: 6, decode_steps: 3, max_prompt_tokens: 48}
quality: {windows: 2, window_len: 64}
"""


def _train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from edgelm.stages.calibration import builtin_prompts

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(builtin_prompts() * 4, trainer)
    return tokenizer


def save_tiny_model(folder: Path, model_type: str = "llama", seed: int = 0) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    backend = _train_tokenizer()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", bos_token="<|im_start|>",
                                        unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    config = AutoConfig.for_model(
        model_type, vocab_size=backend.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        rope_theta=100000.0, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_recipe(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipes") / "tiny.yaml"
    path.write_text(TINY_RECIPE)
    return path


def _build(model_dir: Path, recipe: Path, profile: str, output: Path):
    from edgelm import api

    plan = api.plan_build(profile, recipe, str(model_dir), output.name)
    return api.build(plan, output)


@pytest.fixture(scope="session")
def tiny_bundle_report(tiny_model_dir, tiny_recipe, tmp_path_factory):
    return _build(tiny_model_dir, tiny_recipe, "cpu-fp32", tmp_path_factory.mktemp("bundles") / "tiny-fp32")


@pytest.fixture(scope="session")
def tiny_bundle(tiny_bundle_report) -> Path:
    return tiny_bundle_report.output


@pytest.fixture(scope="session")
def tiny_int8_report(tiny_model_dir, tiny_recipe, tmp_path_factory):
    return _build(tiny_model_dir, tiny_recipe, "cpu-int8", tmp_path_factory.mktemp("bundles") / "tiny-int8")
