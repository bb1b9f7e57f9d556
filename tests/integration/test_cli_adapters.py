"""`edgelm build --adapter`: every adapter that cannot be merged is one `error:` line naming the
adapter, a `hint:` with the fix, exit code 2, and no output folder left behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.stages.test_adapters import make_adapter
from tests.integration.test_cli import _assert_clean_error, _run


def _other_base(folder: Path, **shape: int) -> Path:
    """A tiny model of another shape (hidden size, vocabulary, depth) or architecture."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type = shape.pop("model_type", "llama")
    settings = {"vocab_size": 384, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2} if model_type == "llama" else \
               {"vocab_size": 384, "n_embd": 64, "n_layer": 2, "n_head": 4}
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **{**settings, **shape})).save_pretrained(folder)
    return folder


def _build(tiny_model_dir: Path, tiny_recipe: Path, out: Path, *adapters: str):
    args = ["build", "--profile", "cpu-fp32", "--model", str(tiny_model_dir), "--recipe", str(tiny_recipe), "-o", str(out)]
    for adapter in adapters:
        args += ["--adapter", adapter]
    return _run(*args)


def _assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".edgelm-build-")]


def _broken(kind: str, tiny_model_dir: Path, tmp_path: Path) -> Path:
    path = make_adapter(tiny_model_dir, tmp_path / "adapter")
    weights, config = path / "adapter_model.safetensors", path / "adapter_config.json"
    if kind == "no-config":
        config.unlink()
    elif kind == "bad-json":
        config.write_text('{"peft_type": "LORA", "r": 4,')
    elif kind == "not-lora":
        config.write_text(json.dumps({**json.loads(config.read_text()), "peft_type": "LOHA"}))
    elif kind == "pickle":
        weights.rename(path / "adapter_model.bin")
    elif kind == "no-weights":
        weights.unlink()
    elif kind == "truncated":
        weights.write_bytes(weights.read_bytes()[:200])
    elif kind == "empty":
        from safetensors.numpy import save_file

        save_file({}, str(weights))
    return path


@pytest.mark.parametrize("kind,fragments", [
    ("no-config", ["no adapter_config.json", "save_pretrained"]),
    ("bad-json", ["adapter_config.json: cannot read the adapter config"]),
    ("not-lora", ["peft_type 'LOHA' is not supported", "merge other types with peft first"]),
    ("pickle", ["adapter_model.bin: pickle adapter weights are refused", "weights_only=True"]),
    ("no-weights", ["no adapter_model.safetensors"]),
    ("truncated", ["cannot read the adapter weights", "truncated or corrupt"]),
    ("empty", ["holds no LoRA tensors"]),
])
def test_broken_adapter_files(kind, fragments, tiny_model_dir, tiny_recipe, tmp_path):
    path = _broken(kind, tiny_model_dir, tmp_path)
    out = tmp_path / "out"
    _assert_clean_error(_build(tiny_model_dir, tiny_recipe, out, str(path)), *fragments)
    _assert_nothing_written(out)


@pytest.mark.parametrize("shape,targets,fragments", [
    ({"hidden_size": 32, "intermediate_size": 64}, ("q_proj", "v_proj"), ["has shape", "needs", "hidden size or vocabulary differ"]),
    ({"vocab_size": 500}, ("embed_tokens",), ["embed_tokens", "has shape", "(500, 64)", "needs (384, 64)"]),
    ({"num_hidden_layers": 3}, ("q_proj",), ["targets model.layers.2.self_attn.q_proj", "which this llama model lacks"]),
    ({"model_type": "gpt2"}, ("c_attn",), ["targets transformer.h.0.attn.c_attn", "lacks"]),
], ids=["hidden-size", "vocabulary", "depth", "architecture"])
def test_adapter_for_another_base(shape, targets, fragments, tiny_model_dir, tiny_recipe, tmp_path):
    other = _other_base(tmp_path / "other-base", **shape)
    path = make_adapter(other, tmp_path / "adapter", targets=targets)
    out = tmp_path / "out"
    _assert_clean_error(_build(tiny_model_dir, tiny_recipe, out, str(path)), str(path), *fragments)
    _assert_nothing_written(out)


def test_missing_adapter_and_zero_weight(tiny_model_dir, tiny_recipe, tmp_path):
    out = tmp_path / "out"
    _assert_clean_error(_build(tiny_model_dir, tiny_recipe, out, str(tmp_path / "nope")), "adapter path does not exist")
    path = make_adapter(tiny_model_dir, tmp_path / "adapter")
    _assert_clean_error(_build(tiny_model_dir, tiny_recipe, out, str(path / "adapter_model.safetensors")),
                        "an adapter is a folder, not a file")
    _assert_clean_error(_build(tiny_model_dir, tiny_recipe, out, f"{path}:0"), "adapters.0.weight", "non-zero")
    _assert_nothing_written(out)
