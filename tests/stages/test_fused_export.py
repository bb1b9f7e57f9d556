"""The fused export route: packed QKV + GroupQueryAttention + packed gate/up, last-position
logits on request, and the runtime's IO-bound stepper on both the fused and the generic graph."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import yaml

import edgelm_runtime as er
from edgelm.stages.optimize import count_ops


@pytest.fixture(scope="module")
def generic_bundle(tiny_model_dir, tiny_recipe, tmp_path_factory):
    from edgelm import api

    folder = tmp_path_factory.mktemp("generic")
    profile = folder / "generic.yaml"
    profile.write_text(yaml.safe_dump({"name": "cpu-fp32-generic", "description": "generic export",
                                       "provider": "CPUExecutionProvider", "export": {"graph": "generic"},
                                       "quantization": {"mode": "none"}}))
    return api.build(api.plan_build(profile=str(profile), recipe=tiny_recipe, model=str(tiny_model_dir), name="generic"),
                     folder / "generic").output


def test_fused_graph_has_one_attention_op_and_three_packed_matmuls_per_layer(tiny_bundle, tiny_bundle_report):
    model = onnx.load(str(tiny_bundle / "model.onnx"), load_external_data=False)
    ops = count_ops(model)
    assert ops["GroupQueryAttention"] == 2 and ops["MatMul"] == 2 * 4 + 1  # qkv, o, gate/up, down; LM head
    assert "Softmax" not in ops and ops["SkipSimplifiedLayerNormalization"] >= 2
    inputs = {i.name for i in model.graph.input}
    assert "position_ids" not in inputs and "logits_to_keep" in inputs
    manifest = tiny_bundle_report.manifest
    assert manifest.io.position_ids is None and manifest.io.logits_to_keep == "logits_to_keep"
    assert manifest.kv.share_buffer and manifest.provenance["stages"]["export"]["graph"] == "fused"


def test_generic_graph_keeps_position_ids_and_separate_projections(generic_bundle):
    model = onnx.load(str(generic_bundle / "model.onnx"), load_external_data=False)
    ops = count_ops(model)
    assert "GroupQueryAttention" not in ops and ops["MatMul"] > 2 * 7
    manifest = er.read_manifest(generic_bundle)
    assert manifest.io.position_ids == "position_ids" and not manifest.kv.share_buffer


def test_logits_to_keep_limits_the_prefill_to_the_last_position(tiny_bundle):
    decoder = er.load_bundle(tiny_bundle, threads=1).decoder
    ids = np.arange(3, 20, dtype=np.int64)[None]
    every, _ = decoder.run(ids)
    last, _ = decoder.run(ids, last_only=True)
    assert every.shape[1] == 17 and last.shape[1] == 1
    np.testing.assert_allclose(last[0, 0], every[0, -1], atol=1e-5)


@pytest.mark.parametrize("which", ["fused", "generic"])
def test_stepper_matches_whole_sequence_runs(which, tiny_bundle, generic_bundle):
    """IO binding (shared KV buffer on the fused graph, rebound presents on the generic one)
    gives the logits a plain rerun of the whole sequence gives, step after step."""
    decoder = er.load_bundle(tiny_bundle if which == "fused" else generic_bundle, threads=1).decoder
    ids = [5, 17, 42, 9, 100, 7]
    stepper = decoder.stepper(capacity=len(ids) + 6)
    logits = stepper.feed(np.asarray(ids))
    for _ in range(6):
        full, _ = decoder.run(np.asarray([ids]))
        np.testing.assert_allclose(logits, full[0, -1], atol=1e-4)
        ids.append(int(logits.argmax()))
        logits = stepper.feed(np.asarray(ids[-1:]))
    with pytest.raises(er.GenerationError, match="holds 12"):
        stepper.feed(np.asarray([1, 2]))


def test_fused_and_generic_bundles_generate_the_same_tokens(tiny_bundle, generic_bundle):
    prompt = [5, 17, 42, 9]
    fused = er.load_bundle(tiny_bundle, threads=1).generate_tokens(prompt, 12, er.SamplingParams())
    generic = er.load_bundle(generic_bundle, threads=1).generate_tokens(prompt, 12, er.SamplingParams())
    assert list(fused) == list(generic)


def test_models_the_fused_route_cannot_express_fall_back_with_the_reason():
    """The arch drives the route, so a GELU MLP is expressible; what GroupQueryAttention cannot
    compute (bidirectional attention, an unknown architecture) is refused with the reason."""
    from transformers import Gemma3TextConfig, Gemma3ForCausalLM, LlamaConfig, LlamaForCausalLM

    from edgelm.stages.export.fused import fused_export_refusal

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, hidden_act="gelu")
    assert fused_export_refusal(LlamaForCausalLM(config)) is None
    gemma = Gemma3TextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, head_dim=8,
                             num_attention_heads=4, num_key_value_heads=2, use_bidirectional_attention=True)
    assert "bidirectional" in fused_export_refusal(Gemma3ForCausalLM(gemma))
    unknown = LlamaForCausalLM(config)
    unknown.config.model_type = "not-a-family"
    assert "not supported" in fused_export_refusal(unknown)
