"""Every family loads through LoadModel with its family recorded; a family's context limit is refused
in one line; and a GGUF of Qwen3, Gemma 3, Phi-3 and Llama 3 (written as llama.cpp's converter writes
them) loads to the same weights and logits as the safetensors folder it came from, including the
facts transformers' GGUF reader leaves out (edgelm/stages/load/gguf_config.py)."""

from __future__ import annotations

import json
import shutil

import pytest

from edgelm.errors import ModelLoadError
from edgelm.stages.load import model as load
from tests.conftest import FAMILY_CONFIGS, GGUF_FAMILY_OVERRIDES, save_tiny_family, save_tiny_family_gguf


def _load(model: str, tmp_path, **recipe):
    from edgelm.config import Recipe, load_profile, resolve
    from edgelm.pipeline.stage import BuildState, no_progress

    plan = resolve(Recipe(model=model, **recipe), load_profile("cpu-fp32"))
    state = BuildState(plan=plan, work_dir=tmp_path, bundle_dir=tmp_path)
    facts = load.LoadModel().run(state, no_progress).record()
    return state, facts


@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_every_family_loads_with_its_family_recorded(family, family_model_dirs, tmp_path):
    state, facts = _load(str(family_model_dirs[family]), tmp_path)
    assert facts["family"] == state.source["family"] == family
    assert facts["model_type"] == family and facts["layers"] == FAMILY_CONFIGS[family]["num_hidden_layers"]


def test_family_context_limit_is_refused_in_one_line(family_model_dirs, tmp_path):
    """Phi-3's longrope past original_max_position_embeddings: the precomputed table cannot follow."""
    folder = tmp_path / "phi3-long"
    shutil.copytree(family_model_dirs["phi3"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["original_max_position_embeddings"] = config["rope_parameters"]["original_max_position_embeddings"] = 128
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError) as err:
        _load(str(folder), tmp_path, max_seq_len=256)
    message = str(err.value)
    assert "max_seq_len 256 is refused for phi3" in message and "--max-seq-len 128" in message
    assert "\n" not in message and err.value.hint
    state, _ = _load(str(folder), tmp_path, max_seq_len=128)  # within the original context: fine
    assert state.max_seq_len == 128

    from edgelm import api  # refused before the build starts, from the config alone

    with pytest.raises(ModelLoadError, match="max_seq_len 256 is refused for phi3"):
        api.preflight(api.plan_build(profile="cpu-fp32", model=str(folder), name="x",
                                     overrides=api.BuildOverrides(max_seq_len=256)))


GGUF_FAMILIES = ["qwen3", "gemma3_text", "phi3", "llama"]


@pytest.fixture(scope="module")
def family_ggufs(tmp_path_factory):
    """{family: (safetensors folder, .gguf alone in its folder)}; the model keeps to what a GGUF can state."""
    root = tmp_path_factory.mktemp("family-gguf")
    out = {}
    for family in GGUF_FAMILIES:
        folder = save_tiny_family(root / f"tiny-{family}", family, **GGUF_FAMILY_OVERRIDES.get(family, {}))
        (root / f"{family}-gguf").mkdir()
        out[family] = folder, save_tiny_family_gguf(folder, root / f"{family}-gguf" / f"tiny-{family}-f32.gguf", family)
    return out


@pytest.mark.parametrize("family", GGUF_FAMILIES)
def test_family_gguf_matches_safetensors(family, family_ggufs, tmp_path):
    import torch

    folder, gguf_file = family_ggufs[family]
    reference, _ = _load(str(folder), tmp_path / "ref")
    state, facts = _load(str(gguf_file), tmp_path / "gguf")
    assert state.source["format"] == "gguf" and facts["family"] == family
    assert state.source["model_type"] == family  # gemma3 in the file, gemma3_text once loaded
    config, expected_config = state.model.config, reference.model.config
    for key in ("head_dim", "num_key_value_heads", "tie_word_embeddings", "sliding_window", "query_pre_attn_scalar",
                "layer_types", "original_max_position_embeddings"):
        assert getattr(config, key, None) == getattr(expected_config, key, None), key
    rope, expected_rope = config.rope_parameters, expected_config.rope_parameters
    for kind in ("full_attention", "sliding_attention") if family == "gemma3_text" else (None,):
        got, want = (rope[kind], expected_rope[kind]) if kind else (rope, expected_rope)
        for key in ("rope_type", "factor", "partial_rotary_factor", "low_freq_factor", "high_freq_factor",
                    "original_max_position_embeddings"):
            assert got.get(key) == want.get(key), (kind, key)
        assert got["rope_theta"] == pytest.approx(want["rope_theta"], rel=1e-6)
        for key in ("short_factor", "long_factor"):
            assert got.get(key) == pytest.approx(want.get(key), rel=1e-6) if want.get(key) else key not in got

    # F32 round trip: bit-exact, except Gemma's norms, stored as w + 1 and read back as (w + 1) - 1
    expected_weights, actual_weights = reference.model.state_dict(), state.model.state_dict()
    assert actual_weights.keys() == expected_weights.keys()
    for name, tensor in expected_weights.items():
        torch.testing.assert_close(actual_weights[name], tensor, atol=1e-6 if "norm" in name else 0, rtol=0, msg=name)

    ids = torch.tensor([[1, 5, 17, 42, 100, 250, 383, 2, 7] * 4])  # 36 tokens: past the sliding window (16)
    with torch.no_grad():
        torch.testing.assert_close(state.model(ids).logits, reference.model(ids).logits, atol=1e-4, rtol=0)
    text = "The quick brown fox jumps over the lazy dog. It's 2024!"
    assert state.tokenizer(text)["input_ids"] == reference.tokenizer(text)["input_ids"]


def test_gguf_rope_freqs_that_are_not_llama3_are_refused(tmp_path):
    from types import SimpleNamespace

    from edgelm.stages.load.gguf_config import _llama3_factors, _llama3_rope

    config = SimpleNamespace(rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    factors = _llama3_factors(500000.0, 64, 8.0, 1.0, 4.0, 8192.0)
    assert _llama3_rope(tmp_path / "m.gguf", factors, config)["original_max_position_embeddings"] == 8192
    with pytest.raises(ModelLoadError, match="rope_freqs tensor is not Llama 3's rope scaling") as err:
        _llama3_rope(tmp_path / "m.gguf", [1.0, 2.0, 3.0, 1.5] * 8, config)
    assert "safetensors" in err.value.hint
