"""The torch-side stages on every family, through the arch interface: SmoothQuant and AWQ keep the
fp32 function (Gemma's (1 + w) norms, Phi-3's packed rows), structured pruning shrinks the right
rows and columns (packed Linears consistently) and leaves a model transformers still runs with its
KV cache, sensitivity scores one group per shared input, and recovery's LoRA reaches every Linear."""

from __future__ import annotations

import pytest
import torch

from edgelm.arch import for_model
from tests.conftest import FAMILY_CONFIGS

FAMILIES = tuple(FAMILY_CONFIGS)
# two calibration samples longer than the tiny configs' sliding window (16)
IDS = [[5, 17, 42, 99, 7, 3, 250, 11] * 4, [8, 1, 33, 120, 64, 2] * 5]


def _load(family_model_dirs, family):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(family_model_dirs[family], dtype=torch.float32).eval()


def _logits(model, ids=IDS[0]):
    with torch.no_grad():
        return model(torch.tensor([ids]), use_cache=False).logits[0]


def _close(before, after, tolerance=1e-4):
    return float((before - after).abs().max()) <= tolerance * float(before.abs().max())


def _weights(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _runs_with_cache(model):
    """A full forward, a cached decode that matches it (past the sliding window), and generate."""
    ids = torch.tensor([IDS[0][:24]])
    with torch.no_grad():
        full = model(ids, use_cache=False).logits[0, -1]
        prefix = model(ids[:, :-1], use_cache=True)
        step = model(ids[:, -1:], cache=prefix.cache, use_cache=True).logits[0, -1]
        assert torch.isfinite(full).all() and _close(full, step, 1e-4)
        out = model.generate(ids, max_new_tokens=4, do_sample=False, use_cache=True, pad_token_id=0)
    assert out.shape[1] == ids.shape[1] + 4


@pytest.mark.parametrize("family", FAMILIES)
def test_smoothquant_keeps_the_function_and_changes_the_weights(family, family_model_dirs):
    from edgelm.stages.compress.smooth import collect_input_stats, smooth_model

    model = _load(family_model_dirs, family)
    arch = for_model(model)
    before, weights = _logits(model), _weights(model)
    stats = collect_input_stats(model, IDS)
    assert set(stats) == set(arch.layer_linears(model))
    layers = arch.layers(model)
    readers = sum(len(group.readers) for i, layer in enumerate(layers) for group in arch.input_groups(layer, i, model.config))
    readers += 2 * len(layers)  # the value rows and the output projection, per layer
    result = smooth_model(model, stats, 0.5)
    assert result == {"smoothed_linears": readers, "skipped": {}}
    assert _close(before, _logits(model))
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, weights[name])}
    assert len(changed) > len(arch.layers(model)) * len(arch.linear_paths())
    names = {id(p): name for name, p in model.named_parameters()}
    for layer in arch.layers(model):
        norms = arch.norms(layer)
        assert names[id(norms.attention_in.weight)] in changed and names[id(norms.mlp_in.weight)] in changed
        for untouched in (norms.attention_out, norms.mlp_out):  # Gemma's post-norms take no scale
            assert untouched is None or names[id(untouched.weight)] not in changed


@pytest.mark.parametrize("family", FAMILIES)
def test_awq_keeps_the_function(family, family_model_dirs):
    from edgelm.stages.compress.awq import apply_awq

    model = _load(family_model_dirs, family)
    arch = for_model(model)
    before, weights = _logits(model), _weights(model)
    facts = apply_awq(model, IDS, bits=4, block=32)
    assert _close(before, _logits(model))
    assert facts["groups"] == 3 * len(arch.layers(model)) and "skipped" not in facts
    assert facts["mean_relative_error_after"] <= facts["mean_relative_error_before"]
    if facts["mean_alpha"] > 0:
        assert any(not torch.equal(p, weights[name]) for name, p in model.named_parameters())


@pytest.mark.parametrize("compensate", [False, True], ids=["magnitude", "wanda-compensated"])
@pytest.mark.parametrize("family", FAMILIES)
def test_mlp_channel_pruning_shrinks_gate_up_and_down_alike(family, compensate, family_model_dirs):
    from edgelm.stages.compress.prune import CHANNEL_MULTIPLE, collect_scores, parameter_count, prune_mlp_channels

    assert CHANNEL_MULTIPLE == 32
    model = _load(family_model_dirs, family)
    arch, config = for_model(model), model.config
    params = parameter_count(model)
    stats = collect_scores(model, IDS) if compensate else None
    keep = prune_mlp_channels(model, 0.5, stats, "uniform", compensate=compensate)
    assert keep == [64] * len(arch.layers(model)) and config.intermediate_size == 64
    bias = len(keep) * config.hidden_size if compensate else 0  # compensation adds the down projection a bias
    assert parameter_count(model) == params - len(keep) * 3 * 64 * config.hidden_size + bias
    for layer in arch.layers(model):
        gate, up, down = (arch.role(layer, role, config) for role in ("gate", "up", "down"))
        assert gate.weight.shape == up.weight.shape == (64, config.hidden_size)
        assert down.linear.in_features == 64 and (down.linear.bias is not None) == compensate
        if gate.linear is up.linear:  # Phi-3: one packed Linear, both halves shrank
            assert gate.linear.out_features == 128 and (gate.rows, up.rows) == (slice(0, 64), slice(64, 128))
    _runs_with_cache(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_group_pruning_keeps_query_key_value_and_output_consistent(family, family_model_dirs):
    from edgelm.stages.compress.prune import collect_scores, parameter_count, prune_kv_groups

    model = _load(family_model_dirs, family)
    arch, config = for_model(model), model.config
    heads, kv_heads, head_dim = arch.config_attention(config)
    params = parameter_count(model)
    assert prune_kv_groups(model, 0.5, collect_scores(model, IDS), compensate=True) == kv_heads // 2
    assert arch.config_attention(config) == (heads // 2, kv_heads // 2, head_dim)
    assert parameter_count(model) < params
    for layer in arch.layers(model):
        q, k, v, o = (arch.role(layer, role, config) for role in ("q", "k", "v", "o"))
        assert q.weight.shape[0] == heads // 2 * head_dim and k.weight.shape[0] == v.weight.shape[0] == head_dim
        assert o.linear.in_features == heads // 2 * head_dim
        if q.linear is k.linear:  # Phi-3: the packed qkv Linear holds the kept rows of all three
            assert q.linear.out_features == (heads // 2 + 2) * head_dim
            assert v.rows.stop == q.linear.out_features
    _runs_with_cache(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_drop_keeps_per_layer_config_consistent(family, family_model_dirs):
    from edgelm.stages.compress.prune import drop_layers, parameter_count

    model = _load(family_model_dirs, family)
    arch, config = for_model(model), model.config
    count, params = config.num_hidden_layers, parameter_count(model)
    lists = {field: list(getattr(config, field)) for field in arch.per_layer_config if getattr(config, field, None)}
    kept = list(range(1, count))
    originals = [arch.layers(model)[i] for i in kept]
    drop_layers(model, (0,))
    assert config.num_hidden_layers == count - 1 and parameter_count(model) < params
    assert list(arch.layers(model)) == originals
    for index, layer in enumerate(arch.layers(model)):
        assert arch.attention_module(layer).layer_idx == index
    for field, values in lists.items():
        assert list(getattr(config, field)) == [values[i] for i in kept], field
    if family == "smollm3":  # the NoPE flag each kept layer was built with matches the trimmed list
        assert [int(arch.attention_module(layer).use_rope) for layer in arch.layers(model)] == config.no_rope_layers
    if family == "gemma3_text":
        assert [arch.attention_module(layer).layer_type for layer in arch.layers(model)] == config.layer_types
    _runs_with_cache(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_sparsify_zeroes_every_layer_linear(family, family_model_dirs):
    from edgelm.stages.compress.prune import collect_scores, sparsify

    model = _load(family_model_dirs, family)
    assert sparsify(model, "2:4", 0.5, collect_scores(model, IDS)) == pytest.approx(0.5)
    for linear in for_model(model).layer_linears(model).values():
        assert float((linear.weight == 0).float().mean()) == pytest.approx(0.5)


@pytest.mark.parametrize("family", FAMILIES)
def test_sensitivity_scores_one_group_per_shared_input(family, family_model_dirs):
    from edgelm.config.profile import StaticQDQ
    from edgelm.stages.compress.sensitivity import group_key, measure_sensitivity
    from edgelm.stages.compress.smooth import collect_input_stats

    model = _load(family_model_dirs, family)
    arch = for_model(model)
    ranges = {name: (entry["min"], entry["max"]) for name, entry in collect_input_stats(model, IDS).items()}
    scores = measure_sensitivity(model, IDS, ranges, StaticQDQ(mode="static-qdq"))
    expected = {group_key(path, arch) for path in arch.layer_linears(model)}
    per_layer = 4 if len(arch.linear_paths()) == 4 else 5  # packed: qkv, o, gate_up, down
    assert set(scores) == expected and len(scores) == per_layer * len(arch.layers(model))
    assert all(kl >= 0 for kl in scores.values())


@pytest.mark.parametrize("family", FAMILIES)
def test_recovery_lora_wraps_every_layer_linear(family, family_model_dirs):
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    model = _load(family_model_dirs, family)
    arch = for_model(model)
    wrapped = get_peft_model(model, LoraConfig(r=4, target_modules=list(arch.linear_names())))
    inner = wrapped.base_model.model
    layer_linears = arch.layer_linears(inner)
    assert layer_linears and all(isinstance(module, LoraLayer) for module in layer_linears.values())
    lora = {id(module) for module in inner.modules() if isinstance(module, LoraLayer)}
    assert lora == {id(module) for module in layer_linears.values()}  # nothing outside the layers (the head)


@pytest.mark.parametrize("family", ["llama", "phi3", "gemma3_text"])
def test_recovery_distill_trains_and_merges(family, family_model_dirs):
    import copy
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from edgelm.config.recipe import RecoverySettings
    from edgelm.pipeline.stage import no_progress
    from edgelm.stages.compress.recover import distill

    student = _load(family_model_dirs, family)
    teacher = copy.deepcopy(student).eval()
    arch = for_model(student)
    before = {path: linear.weight.detach().clone() for path, linear in arch.layer_linears(student).items()}
    state = SimpleNamespace(tokenizer=AutoTokenizer.from_pretrained(family_model_dirs[family]), chat_template=None,
                            plan=SimpleNamespace(calibration=SimpleNamespace(source="builtin")))
    settings = RecoverySettings(steps=2, samples=2, seq_len=16, batch_size=2, top_k=8, lora_rank=2, learning_rate=1e-2)
    facts = distill(student, teacher, state, settings, no_progress)
    assert facts["steps"] == 2 and facts["method"] == "lora"
    after = arch.layer_linears(student)
    assert all(type(linear) is torch.nn.Linear for linear in after.values())  # merged back into plain Linears
    assert all(not torch.equal(after[path].weight, weight) for path, weight in before.items())
