"""Profiles, recipes and plans: valid files load, invalid ones name the file and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgelm.config import BuildOverrides, Recipe, list_profiles, load_profile, load_recipe, resolve
from edgelm.config.profile import StaticQDQ, WeightOnly
from edgelm.errors import ConfigError


def test_builtin_profiles_load_with_their_capabilities():
    profiles = {p.name: p for p in list_profiles()}
    assert {"cpu-fp32", "cpu-int8", "cpu-int4", "cpu-int4-fast", "cpu-w8a8"} <= set(profiles)
    fast = profiles["cpu-int4-fast"].quantization  # llama.cpp Q4_0's scheme, everything at 4 bits
    assert (fast.bits, fast.block_size, fast.symmetric, fast.keep_int8, fast.embeddings) == (4, 32, True, (), "int4")
    w8a8 = profiles["cpu-w8a8"].quantization
    assert isinstance(w8a8, StaticQDQ) and w8a8.per_channel and w8a8.activation_dtype == "uint8"
    int8, int4 = profiles["cpu-int8"].quantization, profiles["cpu-int4"].quantization
    assert isinstance(int8, WeightOnly) and int8.bits == 8 and int8.accuracy_level == 4 and int8.rotation == "hadamard"
    assert w8a8.rotation == "hadamard" and w8a8.smoothquant_alpha is None and profiles["npu-qdq"].quantization.rotation == "hadamard"
    assert isinstance(int4, WeightOnly) and int4.bits == 4 and int4.activation_aware and int4.embeddings == "int4"
    assert profiles["cpu-fp32"].quantization.mode == "none"


def test_profile_is_frozen():
    profile = load_profile("cpu-int8")
    with pytest.raises(Exception):
        profile.provider = "CUDAExecutionProvider"


def test_unknown_profile_lists_the_known_ones():
    with pytest.raises(ConfigError) as err:
        load_profile("cpu-int3")
    assert "cpu-int3" in err.value.message and "cpu-int8" in err.value.hint


def test_bad_profile_field_names_file_and_field(tmp_path):
    text = (load_profile("cpu-w8a8").model_dump_json())
    path = tmp_path / "mine.yaml"
    path.write_text(text.replace('"activation_dtype":"uint8"', '"activation_dtype":"int4"'))
    with pytest.raises(ConfigError) as err:
        load_profile(path)
    assert str(path) in err.value.message
    assert "quantization.static-qdq.activation_dtype" in err.value.message and "int4" in err.value.message


def test_unknown_profile_field_is_rejected(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("name: x\ndescription: y\nprovider: CPUExecutionProvider\nquantization: {mode: none}\nfusion: {}\n")
    with pytest.raises(ConfigError, match=r"typo.yaml: fusion: unknown field"):
        load_profile(path)


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nquantization: {mode: none\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: line \d+ YAML syntax error"):
        load_profile(path)


def test_recipe_out_of_range_value(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("calibration: {samples: 0}\n")
    with pytest.raises(ConfigError, match=r"r.yaml: calibration.samples: .*greater than or equal to 1"):
        load_recipe(path)


def test_plan_makes_defaults_explicit_and_overrides_win(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: some/folder\ncalibration: {samples: 10}\nquality: {max_perplexity_ratio: 1.5}\n")
    plan = resolve(load_recipe(path), load_profile("cpu-w8a8"), {"calibration.samples": 20, "model": None})
    assert plan.model == str(tmp_path / "some" / "folder")  # relative to the recipe's folder
    assert plan.calibration.samples == 20 and plan.calibration.decode_steps == 8
    assert plan.quality.max_perplexity_ratio == 1.5
    summary = plan.summary()
    assert summary["profile"]["quantization"]["mode"] == "static-qdq"


def test_invalid_override_is_a_config_error():
    with pytest.raises(ConfigError, match="calibration.samples"):
        resolve(Recipe(), load_profile("cpu-int8"),
                {"calibration.samples": -3})


def test_profile_quality_gates_apply_unless_the_recipe_sets_them(tmp_path):
    profile = load_profile("cpu-int8")
    plan = resolve(Recipe(), profile)
    assert plan.quality.max_perplexity_ratio == profile.quality.max_perplexity_ratio is not None
    path = tmp_path / "r.yaml"
    path.write_text("quality: {max_perplexity_ratio: 2.0}\n")
    plan = resolve(load_recipe(path), profile)
    assert plan.quality.max_perplexity_ratio == 2.0
    assert plan.quality.min_top1_agreement == profile.quality.min_top1_agreement


def test_example_recipes_resolve():
    from pathlib import Path

    recipes = sorted((Path(__file__).parents[2] / "recipes").glob("*.yaml"))
    assert recipes
    for path in recipes:
        recipe = load_recipe(path)
        plan = resolve(recipe, load_profile(recipe.profile or "cpu-int8"))
        assert plan.name and plan.profile.name


def test_accuracy_budget_sets_the_gate_and_turns_on_the_search():
    from edgelm.api import plan_build
    from edgelm.errors import ConfigError as Error

    plan = plan_build(profile="cpu-w8a8", accuracy_budget=1.02)
    assert plan.quality.max_perplexity_ratio == 1.02 and plan.profile.quantization.mixed_precision == "auto"
    for profile in ("cpu-fp32", "cpu-int8"):
        with pytest.raises(Error, match="needs a static-qdq profile"):
            plan_build(profile=profile, accuracy_budget=1.02)


def test_recipe_paths_are_relative_to_the_recipe(tmp_path):
    folder = tmp_path / "recipes"
    folder.mkdir()
    path = folder / "r.yaml"
    path.write_text("adapters: [../adapters/a, {path: /abs/b, weight: 0.25}, 'c:2']\n"
                    "calibration: {source: data/cal.txt}\nquality: {eval_text: builtin}\n")
    recipe = load_recipe(path)
    assert [(a.path, a.weight) for a in recipe.adapters] == [
        (str(tmp_path / "adapters" / "a"), 1.0), ("/abs/b", 0.25), (str(folder / "c"), 2.0)]
    assert recipe.calibration.source == str(folder / "data" / "cal.txt") and recipe.quality.eval_text == "builtin"
    assert recipe.model is None


def test_command_line_beats_recipe_beats_profile(tmp_path):
    from edgelm.api import plan_build

    path = tmp_path / "r.yaml"
    path.write_text("profile: cpu-w8a8\nmodel: m\nmax_seq_len: 512\nadapters: [a, b]\n"
                    "calibration: {samples: 10}\nquality: {max_perplexity_ratio: 1.5}\n")
    from_recipe = plan_build(recipe=path)
    assert from_recipe.profile.name == "cpu-w8a8" and from_recipe.max_seq_len == 512
    assert [a.path for a in from_recipe.adapters] == [str(tmp_path / "a"), str(tmp_path / "b")]
    assert from_recipe.quality.max_perplexity_ratio == 1.5  # recipe over the profile's gate
    flags = plan_build(profile="cpu-fp32", recipe=path, model="other", name="n",
                       overrides=BuildOverrides(samples=3, max_seq_len=128), adapters=["x:0.5"])
    assert flags.profile.name == "cpu-fp32" and flags.model.endswith("/other") and flags.name == "n"
    assert flags.calibration.samples == 3 and flags.max_seq_len == 128
    assert [(a.path, a.weight) for a in flags.adapters] == [(str(Path.cwd() / "x"), 0.5)]  # --adapter replaces the list


def test_prune_section_is_validated(tmp_path):
    from edgelm.api import plan_build, preflight

    bad = tmp_path / "bad.yaml"
    bad.write_text("prune: {kind: structured, mlp_fraction: -0.1}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: prune.mlp_fraction: .*greater than or equal to 0"):
        load_recipe(bad)
    good = tmp_path / "good.yaml"
    good.write_text("prune: {kind: structured, mlp_fraction: 0.25, recover: {steps: 300}}\n")
    plan = plan_build(recipe=good)
    assert plan.prune.mlp_fraction == 0.25 and plan.prune.recover.steps == 300 and plan.prune.recover.method == "lora"
    preflight(plan)  # the default model has 30 layers and 3 KV groups: nothing to refuse
    assert plan_build(overrides=BuildOverrides(prune_mlp=0.1)).prune.kind == "structured"  # --prune-mlp 0.1


def test_unknown_adapter_field_named(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("adapters: [{path: a, wieght: 2}]\n")
    with pytest.raises(ConfigError, match=r"r.yaml: adapters.0.wieght: unknown field"):
        load_recipe(path)


@pytest.mark.parametrize("profile,edit,field", [
    ("cpu-int4", ('"block_size":16', '"block_size":7'), "quantization.weight-only.block_size"),
    ("cpu-w8a8", ('"smoothquant_alpha":null', '"smoothquant_alpha":-0.5'), "quantization.static-qdq.smoothquant_alpha"),
])
def test_out_of_range_profile_values_name_the_field(tmp_path, profile, edit, field):
    text = load_profile(profile).model_dump_json()
    assert edit[0] in text
    path = tmp_path / "mine.yaml"
    path.write_text(text.replace(*edit))
    with pytest.raises(ConfigError) as err:
        load_profile(path)
    assert str(path) in err.value.message and field in err.value.message


def test_npu_profile_is_static_and_lists_its_ops():
    npu = load_profile("npu-qdq")
    assert npu.export.static_shapes and npu.export.opset == 23 and npu.export.projections == "conv1x1"
    assert npu.export.prefill_len < npu.export.kv_window and not npu.fusions.enabled
    q = npu.quantization
    assert isinstance(q, StaticQDQ) and q.ops == "all" and q.activation_dtype == "uint16" and q.weight_dtype == "int8"
    assert {"Conv", "MatMul", "Softmax", "RMSNormalization", "QuantizeLinear", "DequantizeLinear"} <= set(npu.allowed_ops)
    assert "GroupQueryAttention" not in npu.allowed_ops


@pytest.mark.parametrize("edit,message", [
    ({"export": {"opset": 18}}, "export.opset: static graphs need opset 23"),
    ({"fusions": {"enabled": True}}, "fusions.enabled: static graphs are not fused"),
    ({"quantization": {"ops": "weight-matmuls"}}, "quantization.ops: static graphs are quantized on every op"),
    ({"quantization": {"calibration_method": "entropy"}}, "quantization.calibration_method: ops: all calibrates with minmax"),
    ({"quantization": {"mode": "weight-only"}}, "quantization.mode: static graphs take none or static-qdq"),
    ({"export": {"static_shapes": False, "opset": 18}}, "export.projections: conv1x1 needs export.static_shapes: true"),
    ({"export": {"prefill_len": 512}}, "prefill_len 512 must be smaller than kv_window 512"),
    ({"alowed_ops": []}, "alowed_ops: unknown field"),
])
def test_unsupported_npu_combinations_name_file_and_field(tmp_path, edit, message):
    import yaml

    data = load_profile("npu-qdq").model_dump(mode="json")
    for section, value in edit.items():
        if isinstance(value, dict):
            if section == "quantization" and value.get("mode") == "weight-only":
                data[section] = {"mode": "weight-only"}
            else:
                data[section] = {**data[section], **value}
        else:
            data[section] = value
    path = tmp_path / "npu.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as err:
        load_profile(path)
    assert str(path) in err.value.message and message in err.value.message, err.value.message


def test_every_op_quantization_needs_static_shapes(tmp_path):
    import yaml

    data = load_profile("cpu-w8a8").model_dump(mode="json")
    data["quantization"]["ops"] = "all"
    path = tmp_path / "w8a8-all.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"w8a8-all.yaml: quantization.ops: all needs export.static_shapes: true"):
        load_profile(path)


def test_plan_build_takes_keywords_and_typed_overrides():
    from edgelm.api import plan_build

    with pytest.raises(TypeError):
        plan_build("cpu-fp32")  # keyword-only
    with pytest.raises(TypeError, match="BuildOverrides"):
        plan_build(overrides={"max_seq_len": 128})
    plan = plan_build(profile="cpu-w8a8", overrides=BuildOverrides(max_seq_len=128, samples=4, calibration_method="percentile",
                                                                    min_top1_agreement=0.5))
    assert plan.max_seq_len == 128 and plan.calibration.samples == 4 and plan.quality.min_top1_agreement == 0.5
    assert plan.profile.quantization.calibration_method == "percentile"
    with pytest.raises(ConfigError, match="calibration.samples"):
        plan_build(overrides=BuildOverrides(samples=0))
