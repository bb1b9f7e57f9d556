"""A .gguf file loads to the same model and tokenizer as the safetensors folder it was written from,
and a truncated one is refused with a one-line error naming the file."""

from __future__ import annotations

import pytest

from edgelm.errors import ModelLoadError
from edgelm.stages.load import model as load


def _load(model: str, tmp_path):
    from edgelm.config import Recipe, load_profile, resolve
    from edgelm.pipeline.stage import BuildState, no_progress

    plan = resolve(Recipe(model=model), load_profile("cpu-fp32"))
    state = BuildState(plan=plan, work_dir=tmp_path, bundle_dir=tmp_path)
    load.LoadModel().run(state, no_progress)
    return state


def test_gguf_matches_safetensors(tiny_model_dir, tiny_gguf_file, tmp_path):
    import torch

    reference = _load(str(tiny_model_dir), tmp_path / "ref")
    state = _load(str(tiny_gguf_file), tmp_path / "gguf")

    assert state.source["format"] == "gguf"
    assert state.source["path"] == str(tiny_gguf_file)
    assert state.source["model_type"] == "llama"
    assert state.source["parameters"] == reference.source["parameters"]
    config, ref_config = state.model.config, reference.model.config
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings",
                "bos_token_id", "eos_token_id"):
        assert getattr(config, key) == getattr(ref_config, key), key
    # GGUF stores these as float32, so 1e-6 comes back as 9.99999997e-07
    assert config.rms_norm_eps == pytest.approx(ref_config.rms_norm_eps, rel=1e-6)
    assert config.rope_parameters["rope_theta"] == pytest.approx(ref_config.rope_parameters["rope_theta"], rel=1e-6)
    assert state.max_seq_len == reference.max_seq_len

    # F32 round trip: every weight comes back bit-exact, q/k included once transformers undoes the row permutation
    expected_weights = reference.model.state_dict()
    actual_weights = state.model.state_dict()
    assert actual_weights.keys() == expected_weights.keys()
    for name, tensor in expected_weights.items():
        assert actual_weights[name].dtype == torch.float32, name
        assert torch.equal(actual_weights[name], tensor), name
    assert state.model.lm_head.weight.data_ptr() == state.model.model.embed_tokens.weight.data_ptr()

    ids = torch.tensor([[1, 5, 17, 42, 100, 250, 383, 2, 7]])
    with torch.no_grad():
        expected = reference.model(ids).logits
        actual = state.model(ids).logits
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)

    text = "The quick brown fox jumps over the lazy dog. It's 2024!  Twice-spaced\nnew line"
    assert state.tokenizer(text)["input_ids"] == reference.tokenizer(text)["input_ids"]
    assert state.tokenizer.decode(state.tokenizer(text)["input_ids"]) == text
    messages = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi!"}]
    assert state.chat_template == reference.chat_template
    rendered = state.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == reference.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert state.tokenizer(rendered)["input_ids"] == reference.tokenizer(rendered)["input_ids"]
    assert state.tokenizer.convert_ids_to_tokens(state.tokenizer(rendered)["input_ids"][0]) == "<|im_start|>"
    assert (state.tokenizer.bos_token, state.tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")


@pytest.mark.parametrize("keep", [2000, 0.5], ids=["in-metadata", "in-tensor-data"])
def test_truncated_gguf(tiny_gguf_file, tmp_path, keep):
    data = tiny_gguf_file.read_bytes()
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(data[:keep if isinstance(keep, int) else int(len(data) * keep)])
    with pytest.raises(ModelLoadError) as err:
        _load(str(broken), tmp_path)
    message = str(err.value)
    assert str(broken) in message
    assert "cannot read the model config" in message
    assert "\n" not in message and "Traceback" not in message
    assert err.value.hint


def test_gguf_beside_a_tokenizer_json_keeps_its_own_tokenizer(tiny_model_dir, tiny_gguf_file, tmp_path):
    import shutil

    folder = tmp_path / "mixed"
    shutil.copytree(tiny_model_dir, folder)  # has a tokenizer.json that transformers would prefer
    shutil.copy(tiny_gguf_file, folder / "model.gguf")
    state = _load(str(folder / "model.gguf"), tmp_path)
    assert state.source["format"] == "gguf"
    assert state.chat_template and "<|im_start|>" in state.chat_template
    assert state.tokenizer.eos_token == "<|im_end|>"
