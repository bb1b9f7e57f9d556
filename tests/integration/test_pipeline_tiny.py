"""The whole pipeline on the tiny model: what a user checks in the bundle each stage produced."""

from __future__ import annotations

import json

import onnx

from edgelm.stages.optimize import count_ops
from edgelm_runtime.bundle import read_manifest, verify_bundle


def _op_counts(bundle):
    return count_ops(onnx.load(str(bundle / "model.onnx"), load_external_data=False))


def test_fp32_bundle_manifest_records_parity_fusions_and_quality(tiny_bundle):
    manifest = verify_bundle(tiny_bundle)  # sizes and sha256 of every file
    stages = manifest.provenance["stages"]
    parity = stages["export"]["parity"]
    assert parity["max_abs_diff_no_past"] < 1e-4 and parity["max_abs_diff_with_past"] < 1e-4
    assert stages["fuse"]["fused"]["SkipSimplifiedLayerNormalization"] == 4  # 2 layers x 2 norms
    assert manifest.fusions == {"SimplifiedLayerNormalization": 1, "SkipSimplifiedLayerNormalization": 4,
                                "GroupQueryAttention": 2}  # the fused export's attention counts too
    assert manifest.provenance["build_host"]["isa"] and "amx_usable" in manifest.provenance["build_host"]
    assert manifest.quality["perplexity_ratio"] < 1.001 and manifest.quality["top1_agreement"] > 0.99
    assert manifest.plan["profile"]["name"] == "cpu-fp32"
    assert manifest.provenance["source"]["format"] == "safetensors" and len(manifest.provenance["source"]["sha256"]) == 64
    assert manifest.kv.num_layers == 2 and manifest.kv.num_kv_heads == 2 and manifest.kv.head_dim == 16
    assert manifest.chat_template_file and (tiny_bundle / manifest.chat_template_file).is_file()
    assert _op_counts(tiny_bundle).get("SkipSimplifiedLayerNormalization") == 4


def test_tied_embedding_is_stored_once(tiny_bundle, tiny_model_dir):
    from safetensors import safe_open

    with safe_open(str(tiny_model_dir / "model.safetensors"), "np") as weights:
        embedding = weights.get_tensor("model.embed_tokens.weight")
    model = onnx.load(str(tiny_bundle / "model.onnx"))
    same_shape = [i for i in model.graph.initializer if tuple(i.dims) in (embedding.shape, embedding.shape[::-1])]
    assert len(same_shape) == 1


def test_int8_bundle_is_quantized_smaller_and_close(tiny_int8_report, tiny_bundle):
    bundle = tiny_int8_report.output
    manifest = read_manifest(bundle)
    ops = _op_counts(bundle)
    assert ops.get("DequantizeLinear", 0) > 0 and ops.get("QuantizeLinear", 0) > 0
    quantize = manifest.provenance["stages"]["quantize"]
    # 2 layers x (packed qkv, o, packed gate/up) + the LM head (the rotation unties it from the
    # embedding); down_proj is kept fp32 by the cpu-w8a8 profile; the online rotations are no weights
    assert quantize["quantized_matmuls"] == 7 and quantize["kept_float"] == 2
    assert manifest.provenance["stages"]["rotate"]["untied_head"] is True
    assert quantize["calibration_feeds"] == 6 * (1 + 3)  # every sample: one prefill + 3 decode steps
    size = (bundle / "model.onnx.data").stat().st_size
    assert size < (tiny_bundle / "model.onnx.data").stat().st_size
    assert manifest.quality["perplexity_ratio"] < 1.1 and manifest.quality["top1_agreement"] > 0.8
    assert json.loads((bundle / "manifest.json").read_text())["profile"] == "cpu-w8a8"


def test_bundle_greedy_tokens_equal_pytorch(tiny_bundle, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import edgelm_runtime as er

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = tokenizer("Explain why the sky is blue", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        expected = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
    if tokenizer.eos_token_id in expected:  # transformers keeps the eos token; the runtime stops before it
        expected = expected[:expected.index(tokenizer.eos_token_id)]
    llm = er.load_bundle(tiny_bundle)
    got = list(llm.generate_tokens(ids, max_new_tokens=12, sampling=er.SamplingParams()))
    assert got == expected and len(got) > 0


def test_quality_gate_failure_leaves_no_bundle(tiny_model_dir, tiny_recipe, tmp_path):
    import pytest

    from edgelm import api
    from edgelm.errors import QualityGateError

    plan = api.plan_build(profile="cpu-int8", recipe=tiny_recipe, model=str(tiny_model_dir), name="gated",
                          overrides=api.BuildOverrides(max_kl_divergence=1e-9))
    with pytest.raises(QualityGateError, match=r"quality gate failed: KL divergence .* > 1e-09"):
        api.build(plan, tmp_path / "gated")
    assert list(tmp_path.iterdir()) == []


def test_histogram_calibration_streams_feed_by_feed(tiny_model_dir, tiny_recipe, tmp_path):
    """Percentile calibration goes through onnxruntime's strided collection, one feed per chunk
    (prefill and decode shapes mixed), every feed used once; the result is a working int8 bundle."""
    from edgelm import api

    plan = api.plan_build(profile="cpu-w8a8", recipe=tiny_recipe, model=str(tiny_model_dir), name="pct",
                          overrides=api.BuildOverrides(calibration_method="percentile"))
    report = api.build(plan, tmp_path / "pct")
    quantize = report.facts["quantize"]
    assert quantize["calibration_feeds"] == 6 * (1 + 3)
    assert report.manifest.plan["profile"]["quantization"]["calibration_method"] == "percentile"
    assert report.manifest.quality["top1_agreement"] > 0.8


def test_calibration_feeds_come_in_ordered_chunks(tiny_bundle):
    import pytest

    from edgelm.calibration import CalibrationFeeds

    feeds = CalibrationFeeds(tiny_bundle / "model.onnx", [[5, 6, 7], [8, 9]], (2, 2, 16), decode_steps=2)
    assert len(feeds) == 6
    feeds.set_range(0, 3)
    first = [feeds.get_next() for _ in range(4)]
    assert first[3] is None and [f["past_key_values.0.key"].shape[2] for f in first[:3]] == [0, 3, 4]
    with pytest.raises(ValueError, match="in order"):
        feeds.set_range(5, 6)
    feeds.set_range(3, 6)
    second = [feeds.get_next() for _ in range(4)]
    assert second[3] is None and second[0]["input_ids"].tolist() == [[8, 9]]
