"""LoRA merge: edgelm's merged model equals peft's adapter-applied model (one adapter, rsLoRA, DoRA,
and a weighted pair against peft's own weighted combination), and a bundle built with an adapter
runs like the PyTorch base + adapter."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgelm.config.recipe import AdapterSpec
from edgelm.errors import AdapterError
from edgelm.stages.adapt import merge_adapters, read_adapter, read_adapters
from edgelm_runtime.bundle import sha256_file as file_sha256

PROBE = [[5, 17, 42, 99, 3, 250, 7], [11, 12, 13]]


def make_adapter(model_dir: Path, out: Path, seed: int = 1, rank: int = 4, trained: bool = True,
                 targets: tuple[str, ...] = ("q_proj", "v_proj", "down_proj"), **lora: object) -> Path:
    """A peft LoRA adapter for the model in `model_dir`; trained=True gives non-zero B (a real delta)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets), init_lora_weights=not trained, **lora)
    model = get_peft_model(base, config)
    if trained:  # small deltas, like a trained adapter's, so logits stay in a realistic range
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.mul_(0.3)
    model.save_pretrained(out, safe_serialization=True)
    return out


def logits_of(model, probe=PROBE) -> list[np.ndarray]:
    import torch

    with torch.no_grad():
        return [model(torch.tensor([ids])).logits[0].numpy() for ids in probe]


def base_model(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


def peft_applied(model_dir: Path, adapters: list[tuple[Path, float]]):
    """peft's own unmerged model: one adapter as saved, or peft's weighted combination ("cat": the
    exact weighted sum of the deltas) of several."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(base_model(model_dir), str(adapters[0][0]), adapter_name="a0")
    for i, (path, _) in enumerate(adapters[1:], 1):
        model.load_adapter(str(path), adapter_name=f"a{i}")
    if len(adapters) > 1:
        model.add_weighted_adapter([f"a{i}" for i in range(len(adapters))], [w for _, w in adapters], "mix",
                                   combination_type="cat")
        model.set_adapter("mix")
    return model.eval()


@pytest.mark.parametrize("variant", [{}, {"use_rslora": True}, {"use_dora": True}], ids=["lora", "rslora", "dora"])
def test_single_merge_equals_unmerged(tiny_model_dir, tmp_path, variant):
    path = make_adapter(tiny_model_dir, tmp_path / "adapter", **variant)
    merged, records = merge_adapters(base_model(tiny_model_dir), [read_adapter(AdapterSpec(path=str(path)))], PROBE)
    reference = logits_of(peft_applied(tiny_model_dir, [(path, 1.0)]))
    base = logits_of(base_model(tiny_model_dir))
    for got, want, before in zip(logits_of(merged), reference, base):
        np.testing.assert_allclose(got, want, atol=1e-5)
        assert np.abs(got - before).max() > 1e-3  # the adapter really changed the model
    record = records[0]
    assert record["sha256"] == file_sha256(path / "adapter_model.safetensors") and record["weight"] == 1.0
    assert record["variant"] == (next(iter(variant), "lora").replace("use_", "")) and record["merge_max_abs_diff"] < 1e-4
    assert type(merged).__name__ == "LlamaForCausalLM"  # a plain model again, ready to export


def test_modules_to_save_merges_as_peft_applies_it(tiny_model_dir, tmp_path):
    import torch

    path = make_adapter(tiny_model_dir, tmp_path / "adapter", modules_to_save=["lm_head"], targets=("q_proj",))
    from safetensors.torch import load_file, save_file

    weights = load_file(str(path / "adapter_model.safetensors"))
    head = next(k for k in weights if "lm_head" in k)
    weights[head] = weights[head] + 0.05 * torch.randn_like(weights[head])  # a trained head, not the base copy
    save_file(weights, str(path / "adapter_model.safetensors"))
    merged, _ = merge_adapters(base_model(tiny_model_dir), [read_adapter(AdapterSpec(path=str(path)))], PROBE)
    for got, want in zip(logits_of(merged), logits_of(peft_applied(tiny_model_dir, [(path, 1.0)]))):
        np.testing.assert_allclose(got, want, atol=1e-5)
    with pytest.raises(AdapterError, match="modules_to_save .* cannot be weighted or combined"):
        read_adapters([AdapterSpec(path=str(path), weight=0.5)])


def test_two_weighted_adapters_equal_peft_weighted_combination(tiny_model_dir, tmp_path):
    first = make_adapter(tiny_model_dir, tmp_path / "a", seed=1, rank=4, targets=("q_proj", "v_proj"))
    second = make_adapter(tiny_model_dir, tmp_path / "b", seed=2, rank=2, targets=("q_proj", "o_proj", "up_proj"))
    specs = [AdapterSpec(path=str(first), weight=0.7), AdapterSpec(path=str(second), weight=-0.4)]
    merged, records = merge_adapters(base_model(tiny_model_dir), read_adapters(specs), PROBE)
    reference = logits_of(peft_applied(tiny_model_dir, [(first, 0.7), (second, -0.4)]))
    for got, want in zip(logits_of(merged), reference):
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert [r["weight"] for r in records] == [0.7, -0.4]


def test_untrained_adapter_is_reported(tiny_model_dir, tiny_recipe, tmp_path):
    """peft's default init has B = 0: merging changes nothing, which the build summary says."""
    from transformers import AutoTokenizer

    from edgelm import api
    from edgelm.pipeline.stage import BuildState, no_progress
    from edgelm.stages.adapt import MergeAdapters

    path = make_adapter(tiny_model_dir, tmp_path / "zero", trained=False)
    plan = api.plan_build(profile="cpu-fp32", recipe=tiny_recipe, model=str(tiny_model_dir), name="zero", adapters=[str(path)])
    state = BuildState(plan=plan, work_dir=tmp_path, bundle_dir=tmp_path / "b", model=base_model(tiny_model_dir),
                       tokenizer=AutoTokenizer.from_pretrained(tiny_model_dir))
    result = MergeAdapters().run(state, no_progress)
    assert result.merged[0]["no_effect"] and result.merged[0]["logit_shift"] == 0.0
    assert result.warnings == ["zero: merging it changed no logit"]


def test_bundle_with_adapter_runs_like_base_plus_adapter(tiny_model_dir, tiny_recipe, tmp_path):
    """The user-level promise: the fp32 bundle built with --adapter computes what peft's
    unmerged base + adapter computes, and the manifest says which adapter at which weight."""
    import edgelm_runtime

    from edgelm import api

    path = make_adapter(tiny_model_dir, tmp_path / "adapter", seed=3)
    plan = api.plan_build(profile="cpu-fp32", recipe=tiny_recipe, model=str(tiny_model_dir), name="with-adapter",
                          adapters=[f"{path}:0.5"])
    report = api.build(plan, tmp_path / "bundle")
    llm = edgelm_runtime.load_bundle(report.output)
    reference = logits_of(peft_applied(tiny_model_dir, [(path, 1.0)]).eval(), [PROBE[0]])[0]
    # weight 0.5 against peft at weight 1: scale peft's delta by hand through the layers' set_scale
    from peft.tuners.lora import LoraLayer

    half = peft_applied(tiny_model_dir, [(path, 1.0)])
    for layer in half.modules():
        if isinstance(layer, LoraLayer):
            layer.set_scale("a0", 0.5)
    want = logits_of(half, [PROBE[0]])[0]
    got = llm.logits(PROBE[0])
    np.testing.assert_allclose(got, want, atol=2e-4)
    assert np.abs(want - reference).max() > 1e-3  # the weight mattered
    entry = report.manifest.adapters[0]
    assert entry["path"] == str(path.resolve()) and entry["weight"] == 0.5 and entry["merge_max_abs_diff"] < 1e-4
    assert entry["sha256"] == file_sha256(path / "adapter_model.safetensors")
    on_disk = json.loads((report.output / "manifest.json").read_text())
    assert on_disk["adapters"][0]["sha256"] == entry["sha256"] and on_disk["plan"]["adapters"][0]["weight"] == 0.5


# --- files that are not a mergeable adapter: each is one AdapterError naming the adapter and the fix


def _adapter_copy(tiny_model_dir, tmp_path) -> Path:
    return make_adapter(tiny_model_dir, tmp_path / "adapter")


def test_missing_path(tmp_path):
    with pytest.raises(AdapterError, match="adapter path does not exist"):
        read_adapter(AdapterSpec(path=str(tmp_path / "nope")))


def test_pickle_weights_refused_with_conversion_hint(tiny_model_dir, tmp_path):
    path = _adapter_copy(tiny_model_dir, tmp_path)
    (path / "adapter_model.safetensors").rename(path / "adapter_model.bin")
    with pytest.raises(AdapterError, match="pickle adapter weights are refused") as err:
        read_adapter(AdapterSpec(path=str(path)))
    assert "save_file" in err.value.hint and "weights_only=True" in err.value.hint


def test_dora_with_weight_refused(tiny_model_dir, tmp_path):
    path = make_adapter(tiny_model_dir, tmp_path / "dora", use_dora=True)
    with pytest.raises(AdapterError, match="DoRA adapter merges only at weight 1.0"):
        read_adapter(AdapterSpec(path=str(path), weight=0.5))


def test_dora_with_another_adapter_refused(tiny_model_dir, tmp_path):
    dora = make_adapter(tiny_model_dir, tmp_path / "dora", use_dora=True)
    plain = make_adapter(tiny_model_dir, tmp_path / "plain")
    with pytest.raises(AdapterError, match="cannot be combined"):
        read_adapters([AdapterSpec(path=str(plain)), AdapterSpec(path=str(dora))])


def test_changed_adapter_is_noticed(tiny_model_dir, tmp_path):
    path = _adapter_copy(tiny_model_dir, tmp_path)
    with pytest.raises(AdapterError, match="changed since the bundle was built"):
        read_adapters([AdapterSpec(path=str(path), sha256="0" * 64)])


@pytest.mark.parametrize("text,expected", [("a/b", {"path": "a/b"}), ("a/b:0.5", {"path": "a/b", "weight": 0.5}),
                                           ("C:/x/y:-1", {"path": "C:/x/y", "weight": -1.0}), ("odd:name", {"path": "odd:name"})])
def test_adapter_weight_syntax(text, expected):
    from edgelm.config.recipe import parse_adapter

    assert parse_adapter(text) == expected


def test_plan_round_trips_through_the_manifest_and_rebuilds(tiny_model_dir, tiny_recipe, tmp_path):
    import edgelm_runtime

    from edgelm import api
    from edgelm.config.plan import BuildPlan
    from tests.integration.test_cli import _assert_clean_error, _run

    path = make_adapter(tiny_model_dir, tmp_path / "adapter", seed=4)
    plan = api.plan_build(profile="cpu-fp32", recipe=tiny_recipe, model=str(tiny_model_dir), name="first", adapters=[str(path)])
    first = api.build(plan, tmp_path / "x")
    assert BuildPlan.model_validate(first.manifest.plan) == plan

    replay = api.plan_build(from_bundle=first.output)
    assert replay.model_dump(exclude={"adapters"}) == plan.model_dump(exclude={"adapters"})
    assert replay.adapters[0].path == plan.adapters[0].path
    assert replay.adapters[0].sha256 == first.manifest.adapters[0]["sha256"]  # pinned to the merged weights

    result = _run("build", "--from-bundle", str(first.output), "-o", str(tmp_path / "y"))
    assert result.exit_code == 0, result.output
    again = edgelm_runtime.load_bundle(tmp_path / "y")
    assert again.manifest.name == "first" and again.manifest.adapters[0]["sha256"] == first.manifest.adapters[0]["sha256"]
    np.testing.assert_allclose(again.logits(PROBE[0]), edgelm_runtime.load_bundle(first.output).logits(PROBE[0]), atol=1e-5)

    shown = _run("plan", "--from-bundle", str(first.output), "--profile", "cpu-int8", "--calibration-samples", "5")
    assert shown.exit_code == 0, shown.output
    shown_plan = json.loads(shown.output)
    assert shown_plan["profile"]["name"] == "cpu-int8" and shown_plan["calibration"]["samples"] == 5
    assert shown_plan["adapters"][0]["path"] == str(path.resolve())

    make_adapter(tiny_model_dir, path, seed=5)  # the adapter changed on disk since the build
    _assert_clean_error(_run("build", "--from-bundle", str(first.output), "-o", str(tmp_path / "z")),
                        "changed since the bundle was built", "--adapter")
    assert not (tmp_path / "z").exists()


def test_static_quantization_calibrates_the_merged_model_on_adapter_domain_text(tiny_model_dir, tiny_recipe, tmp_path):
    """Adapters shift activations: a static-QDQ build calibrates after the merge, on the recipe's
    calibration file, and its quality is measured against base + adapter (not the bare base)."""
    from edgelm import api

    path = make_adapter(tiny_model_dir, tmp_path / "adapter", seed=6)
    domain = tmp_path / "domain.txt"
    domain.write_text("\n".join(f"Review {i}: a film about trains, sentiment positive" for i in range(8)) + "\n")
    plan = api.plan_build(profile="cpu-w8a8", recipe=tiny_recipe, model=str(tiny_model_dir), name="w8a8-adapter",
                          overrides=api.BuildOverrides(calibration_source=str(domain)), adapters=[str(path)])
    report = api.build(plan, tmp_path / "bundle")
    stages = report.manifest.provenance["stages"]
    assert list(stages)[:3] == ["preflight", "load", "adapters"] and stages["adapters"]["adapters"] == 1
    assert stages["quantize"]["calibration_source"] == str(domain) and stages["quantize"]["calibration_samples"] == 6
    assert report.manifest.quality["top1_agreement"] > 0.5
