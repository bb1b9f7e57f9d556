"""Pruning on the tiny model: structured pruning really shrinks the model and the bundle, the bundle
generates what the pruned PyTorch model generates, 0 % is the identity, sparsity zeroes what it
says, recovery lowers the distillation loss, and impossible settings are refused by name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import edgelm_runtime as er
from edgelm import api
from edgelm.errors import ConfigError
from edgelm.pipeline.stage import BuildState, no_progress
from edgelm.stages.load.model import LoadModel
from edgelm.stages.compress.prune import Prune

BASE = "max_seq_len: 256\ncalibration: {samples: 6, decode_steps: 3, max_prompt_tokens: 48}\nquality: {windows: 2, window_len: 64}\n"
PROMPT = "The weather today is bright and the wind is calm"


def _recipe(tmp_path: Path, prune: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(BASE + f"prune: {prune}\n")
    return path


def _build(tiny_model_dir: Path, recipe: Path, out: Path, profile: str = "cpu-fp32"):
    return api.build(api.plan_build(profile=profile, recipe=recipe, model=str(tiny_model_dir), name=out.name), out)


def _pruned_model(tiny_model_dir: Path, recipe: Path, tmp_path: Path):
    """The PyTorch model the build exported: the same stages, run again (they are deterministic)."""
    state = BuildState(plan=api.plan_build(profile="cpu-fp32", recipe=recipe, model=str(tiny_model_dir)),
                       work_dir=tmp_path, bundle_dir=tmp_path)
    LoadModel().run(state, no_progress)
    facts = Prune().run(state, no_progress).record()
    return state, facts


def _size(bundle: Path) -> int:
    return (bundle / "model.onnx.data").stat().st_size


def test_structured_pruning_shrinks_the_model_and_the_bundle_keeps_its_tokens(tiny_model_dir, tiny_bundle, tmp_path):
    import torch

    recipe = _recipe(tmp_path, "{kind: structured, mlp_fraction: 0.5, kv_groups_fraction: 0.5, drop_layers: [1]}")
    report = _build(tiny_model_dir, recipe, tmp_path / "pruned")
    pruning = report.manifest.pruning
    assert pruning["kind"] == "structured" and pruning["params_after"] < pruning["params_before"]
    assert pruning["mlp_channels"] == [64] and pruning["kv_heads"] == 1 and pruning["layers"] == 1
    assert report.manifest.kv.num_layers == 1 and report.manifest.kv.num_kv_heads == 1
    assert _size(report.output) < 0.7 * _size(tiny_bundle)
    ratio = pruning["bundle_perplexity_ratio_vs_unpruned"]
    assert ratio == pytest.approx(report.manifest.quality["perplexity"] / pruning["perplexity_before"], rel=1e-3)
    from rich.console import Console

    from edgelm._render import build_summary

    console = Console(width=300, record=True)
    console.print(build_summary(report))
    assert f"bundle ppl x{ratio:.3f} vs the unpruned fp32 model" in console.export_text()
    state, facts = _pruned_model(tiny_model_dir, recipe, tmp_path / "again")
    assert facts["params_after"] == pruning["params_after"] == sum(p.numel() for p in state.model.parameters())
    ids = state.tokenizer(PROMPT)["input_ids"]
    with torch.no_grad():
        expected = state.model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                                        min_new_tokens=12)[0, len(ids):].tolist()
    llm = er.load_bundle(report.output)
    assert list(llm.generate_tokens(ids, max_new_tokens=12)) == expected


def test_nothing_pruned_is_the_identity(tiny_model_dir, tiny_bundle, tmp_path):
    report = _build(tiny_model_dir, _recipe(tmp_path, "{kind: structured, mlp_fraction: 0.0}"), tmp_path / "zero")
    assert report.manifest.pruning["params_after"] == report.manifest.pruning["params_before"]
    ids = er.load_bundle(tiny_bundle).tokenizer.encode(PROMPT)
    np.testing.assert_allclose(er.load_bundle(report.output).logits(ids), er.load_bundle(tiny_bundle).logits(ids), atol=1e-5)


def test_global_allocation_keeps_more_where_channels_matter(tiny_model_dir, tmp_path):
    """Per-layer MLP sizes: the export takes them as they are, and the bundle still generates what
    the pruned PyTorch model generates."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    # layer 0: half its channels nearly silent (a skewed layer); layer 1 as initialised (flat)
    model_dir = tmp_path / "skewed"
    shutil.copytree(tiny_model_dir, model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[:, ::2] *= 0.01
    model.save_pretrained(model_dir)
    recipe = _recipe(tmp_path, "{kind: structured, mlp_fraction: 0.25, allocation: global}")
    state, facts = _pruned_model(model_dir, recipe, tmp_path / "again")
    assert facts["mlp_channels"] == [64, 128]
    report = _build(model_dir, recipe, tmp_path / "global")
    assert report.manifest.pruning["mlp_channels"] == facts["mlp_channels"]
    ids = state.tokenizer(PROMPT)["input_ids"]
    with torch.no_grad():
        expected = state.model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                                        min_new_tokens=12)[0, len(ids):].tolist()
    assert list(er.load_bundle(report.output).generate_tokens(ids, max_new_tokens=12)) == expected


@pytest.mark.parametrize("prune,check", [
    ("{kind: unstructured, sparsity: 0.5}", "half"),
    ("{kind: unstructured, sparsity: 0.5, importance: magnitude}", "half"),
    ("{kind: '2:4'}", "two-of-four"),
])
def test_sparsity_zeroes_what_it_says(tiny_model_dir, tmp_path, prune, check):
    import torch

    state, facts = _pruned_model(tiny_model_dir, _recipe(tmp_path, prune), tmp_path)
    assert facts["params_after"] == facts["params_before"] and facts["nonzero_params_after"] < facts["params_before"]
    assert facts["zeroed_fraction"] == pytest.approx(0.5, abs=0.01)
    for name, module in state.model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("model.layers."):
            zeros = (module.weight == 0)
            if check == "half":
                assert (zeros.sum(1) == module.weight.shape[1] // 2).all()
            else:
                assert (zeros.reshape(module.weight.shape[0], -1, 4).sum(-1) >= 2).all()


def test_recovery_lowers_the_distillation_loss(tiny_model_dir, tmp_path):
    recipe = _recipe(tmp_path, "{kind: structured, mlp_fraction: 0.5, recover: {steps: 30, method: full, "
                               "learning_rate: 0.003, samples: 8, seq_len: 32, batch_size: 4}}")
    state, facts = _pruned_model(tiny_model_dir, recipe, tmp_path)
    recovery = facts["recovery"]
    assert recovery["kl_last"] < recovery["kl_first"] and recovery["sequences"] == 8
    assert not any(p.requires_grad for p in state.model.parameters())


def test_lora_recovery_merges_into_plain_linears(tiny_model_dir, tmp_path):
    import torch

    recipe = _recipe(tmp_path, "{kind: structured, mlp_fraction: 0.5, recover: {steps: 3, samples: 4, seq_len: 32}}")
    state, facts = _pruned_model(tiny_model_dir, recipe, tmp_path)
    assert facts["recovery"]["method"] == "lora"
    assert all(type(m) is torch.nn.Linear for n, m in state.model.named_modules() if n.endswith("proj"))


@pytest.mark.parametrize("prune,message", [
    ("{drop_layers: [0, 1]}", "prune.drop_layers: dropping all 2 layers leaves no model"),
    ("{drop_layers: [5]}", "prune.drop_layers: layer 5 does not exist (the model has 2: 0-1)"),
    ("{kv_groups_fraction: 0.9}", "prune.kv_groups_fraction: 0.9 of 2 KV groups removes all of them"),
    ("{kv_groups_fraction: 0.1}", "prune.kv_groups_fraction: 0.1 of 2 KV groups removes none"),
])
def test_impossible_pruning_is_refused_before_the_build(tiny_model_dir, tmp_path, prune, message):
    plan = api.plan_build(profile="cpu-fp32", recipe=_recipe(tmp_path, prune), model=str(tiny_model_dir))
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        api.preflight(plan)


@pytest.mark.parametrize("prune,message", [
    ("{mlp_fraction: 1.0}", "prune.mlp_fraction: Input should be less than 1"),
    ("{kind: unstructured}", "kind: unstructured needs sparsity"),
    ("{kind: '2:4', mlp_fraction: 0.2}", "mlp_fraction, kv_groups_fraction and drop_layers are for kind: structured"),
    ("{sparsity: 0.5}", "sparsity is for kind: unstructured"),
    ("{drop_layers: [1, 1]}", "layer indices must be distinct"),
    ("{kind: unstructured, sparsity: 0.5, recover: {steps: 10}}", "recover is for kind: structured .* fill the zeros back in"),
])
def test_invalid_prune_settings_name_the_field(tiny_model_dir, tmp_path, prune, message):
    from edgelm.config import load_recipe

    with pytest.raises(ConfigError, match=message) as err:
        load_recipe(_recipe(tmp_path, prune))
    assert "r.yaml: prune" in err.value.message


def test_bias_compensation_keeps_the_mean_output_on_calibration_text(tiny_model_dir, tmp_path):
    """With compensate, each pruned MLP's output has the unpruned MLP's mean over the calibration
    tokens (the removed channels' mean contribution is its down_proj bias now)."""
    import copy

    import torch

    from edgelm.calibration import calibration_token_ids
    from edgelm.stages.compress.prune import collect_scores, prune_mlp_channels

    state = BuildState(plan=api.plan_build(profile="cpu-fp32", recipe=_recipe(tmp_path, "{mlp_fraction: 0.5}"),
                                            model=str(tiny_model_dir)),
                       work_dir=tmp_path, bundle_dir=tmp_path)
    LoadModel().run(state, no_progress)
    ids = calibration_token_ids("builtin", state.tokenizer, state.chat_template, 6, 48)
    stats = collect_scores(state.model, ids)
    original = copy.deepcopy(state.model.model.layers[0].mlp)
    prune_mlp_channels(state.model, 0.5, stats, "uniform", compensate=True)
    pruned = state.model.model.layers[0].mlp
    entry = stats["layers.0.mlp.down_proj"]
    hidden = entry["sum"] / entry["count"]  # the mean down_proj input; its image is the mean output
    with torch.no_grad():
        columns = pruned.down_proj.weight.T
        kept = torch.tensor([i for i, column in enumerate(original.down_proj.weight.T)
                             if any(torch.equal(column, other) for other in columns)])
        assert len(kept) == 64 and pruned.down_proj.bias is not None
        torch.testing.assert_close(pruned.down_proj(hidden[kept]), original.down_proj(hidden), atol=1e-5, rtol=1e-4)


def test_a_pruned_build_that_misses_its_gate_points_to_recovery(tiny_model_dir, tmp_path):
    """Measured on SmolLM2: a pruned, unrecovered model quantizes worse (top-1 0.943 < 0.95 at 25 %),
    so the gate's hint names recovery; nothing is written."""
    from edgelm.errors import QualityGateError

    plan = api.plan_build(profile="cpu-int8", recipe=_recipe(tmp_path, "{mlp_fraction: 0.25}"), model=str(tiny_model_dir),
                          name="gated", overrides=api.BuildOverrides(max_kl_divergence=1e-9))
    with pytest.raises(QualityGateError) as failure:
        api.build(plan, tmp_path / "out" / "gated")
    assert "prune.recover" in failure.value.hint
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
