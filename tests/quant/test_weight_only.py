"""Weight-only quantization (MatMulNBits): every weight MatMul and the LM head really quantized,
the bundle smaller and still faithful; invalid combinations rejected with the field named."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import yaml
from onnx import helper, numpy_helper

from edgelm.errors import ConfigError
from edgelm.stages.optimize import count_ops
from edgelm.quant.matmul_nbits import untie_lm_head


def _profile(tmp_path, **quantization):
    data = {"name": "test-wo", "description": "weight-only test profile", "provider": "CPUExecutionProvider",
            "quantization": {"mode": "weight-only", **quantization}}
    path = tmp_path / "wo.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def int4_report(tiny_model_dir, tiny_recipe, tmp_path_factory):
    from edgelm import api

    folder = tmp_path_factory.mktemp("wo")
    profile = _profile(folder, bits=4, symmetric=True, embeddings="int4")
    return api.build(api.plan_build(profile=str(profile), recipe=tiny_recipe, model=str(tiny_model_dir), name="tiny-int4"),
                     folder / "tiny-int4")


def test_int4_bundle_quantizes_every_weight_matmul_head_and_embedding(int4_report, tiny_bundle):
    bundle = int4_report.output
    model = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
    ops = count_ops(model)
    inits = {i.name for i in model.graph.initializer}
    assert ops["MatMulNBits"] == 2 * 4 + 1  # 2 layers x (packed qkv, o, packed gate/up, down) + the tied LM head
    assert not [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    assert ops.get("GatherBlockQuantized") == 1 and "Gather" not in ops
    assert all(a.i == 4 for n in model.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level")
    facts = int4_report.facts["quantize"]
    assert facts["lm_head_quantized"] and facts["quantized_embeddings"] == 1
    assert (bundle / "model.onnx.data").stat().st_size < 0.5 * (tiny_bundle / "model.onnx.data").stat().st_size
    quality = int4_report.manifest.quality
    assert quality["perplexity_ratio"] < 1.05 and quality["top1_agreement"] >= 0.9


def test_int4_bundle_generates_like_the_fp32_bundle(int4_report, tiny_bundle):
    import edgelm_runtime as er

    fp32, int4 = er.load_bundle(tiny_bundle), er.load_bundle(int4_report.output)
    ids = fp32.tokenizer.encode("Explain why the sky is blue", add_special_tokens=False)
    expected = list(fp32.generate_tokens(ids, max_new_tokens=8, sampling=er.SamplingParams()))
    assert list(int4.generate_tokens(ids, max_new_tokens=8, sampling=er.SamplingParams())) == expected


def test_keep_float_and_float_head_stay_matmul(tiny_model_dir, tiny_recipe, tmp_path):
    from edgelm import api

    profile = _profile(tmp_path, bits=8, symmetric=True, lm_head="float", keep_float=["down_proj"])
    report = api.build(api.plan_build(profile=str(profile), recipe=tiny_recipe, model=str(tiny_model_dir), name="w8"),
                       tmp_path / "w8")
    ops = count_ops(onnx.load(str(report.output / "model.onnx"), load_external_data=False))
    assert ops["MatMulNBits"] == 2 * 3 and report.facts["quantize"]["kept_float"] == 2  # down_proj x2; the tied head was never untied
    assert not report.facts["quantize"]["lm_head_quantized"]


def test_keep_int8_mixes_8_and_4_bit_matmuls(tiny_model_dir, tiny_recipe, tmp_path):
    from edgelm import api

    profile = _profile(tmp_path, bits=4, algorithm="hqq", keep_int8=["down_proj", "lm_head"])
    report = api.build(api.plan_build(profile=str(profile), recipe=tiny_recipe, model=str(tiny_model_dir), name="mixed"),
                       tmp_path / "mixed")
    model = onnx.load(str(report.output / "model.onnx"), load_external_data=False)
    bits = [next(a.i for a in n.attribute if a.name == "bits") for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert sorted(bits) == [4] * 6 + [8] * 3  # qkv, o, gate/up x 2 layers at 4 bits; down x 2 + head at 8
    assert report.facts["quantize"]["int8_matmuls"] == 3


@pytest.mark.parametrize(("field", "value", "message"), [
    ("bits", 3, "quantization.weight-only.bits"),
    ("block_size", 48, "quantization.weight-only.block_size"),
    ("algorithm", "gptq", "quantization.weight-only.algorithm"),
    ("keep_int8", ["down_proj"], "keep_int8 needs bits: 4"),
])
def test_invalid_weight_only_fields_name_the_field(tmp_path, field, value, message):
    from edgelm.config.profile import load_profile

    with pytest.raises(ConfigError, match=message):
        load_profile(_profile(tmp_path, **{"bits": 8, field: value} if field == "keep_int8" else {field: value}))


def test_symmetric_hqq_is_rejected(tmp_path):
    from edgelm.config.profile import load_profile

    with pytest.raises(ConfigError, match="symmetric: true needs algorithm rtn"):
        load_profile(_profile(tmp_path, algorithm="hqq", symmetric=True))


def test_untie_lm_head_gives_the_head_its_own_weight():
    weight = np.arange(12, dtype=np.float32).reshape(4, 3)  # (vocab, hidden)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["emb", "ids"], ["h"]), helper.make_node("Transpose", ["emb"], ["emb_t"], perm=[1, 0]),
         helper.make_node("MatMul", ["h", "emb_t"], ["logits"], name="head")],
        "g", [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [2, 4])], [numpy_helper.from_array(weight, "emb")])
    model = helper.make_model(graph)
    assert untie_lm_head(model) == ["head"]
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    head = next(n for n in model.graph.node if n.name == "head")
    np.testing.assert_array_equal(inits[head.input[1]], weight.T)
    assert [n.op_type for n in model.graph.node] == ["Gather", "MatMul"] and model.graph.node[0].input[0] == "emb"


def test_awq_keeps_the_fp32_function_and_lowers_the_4bit_error(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from edgelm.stages.compress.awq import apply_awq

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    # give a few input channels the large activations real LMs have, so scaling has work to do
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[:4] *= 20
            layer.post_attention_layernorm.weight[:4] *= 20
    ids = [[5, 17, 42, 99, 7, 3, 250, 11] * 6, [8, 1, 33, 120, 64, 2] * 8]
    with torch.no_grad():
        before = model(torch.tensor([ids[0]])).logits
    facts = apply_awq(model, ids, bits=4, block=32)
    with torch.no_grad():
        after = model(torch.tensor([ids[0]])).logits
    assert torch.allclose(before, after, atol=1e-4)  # an exact re-parametrisation in fp32
    assert facts["groups"] == 2 * 3
    assert facts["mean_relative_error_after"] < facts["mean_relative_error_before"]
    assert facts["mean_alpha"] > 0


def test_default_cpu_int8_profile_is_8bit_weight_only(tiny_model_dir, tiny_recipe, tmp_path):
    from edgelm import api

    report = api.build(api.plan_build(profile="cpu-int8", recipe=tiny_recipe, model=str(tiny_model_dir), name="int8"),
                       tmp_path / "int8")
    model = onnx.load(str(report.output / "model.onnx"), load_external_data=False)
    bits = [next(a.i for a in n.attribute if a.name == "bits") for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert bits == [8] * 9 and "QuantizeLinear" not in count_ops(model)
    assert report.manifest.quality["perplexity_ratio"] <= 1.02 and report.manifest.quality["top1_agreement"] >= 0.95


def test_cpu_int4_profile_mixes_awq_4bit_and_8bit_sensitive_matmuls(tiny_model_dir, tiny_recipe, tmp_path):
    from edgelm import api

    report = api.build(api.plan_build(profile="cpu-int4", recipe=tiny_recipe, model=str(tiny_model_dir), name="int4"),
                       tmp_path / "int4")
    model = onnx.load(str(report.output / "model.onnx"), load_external_data=False)
    bits = [next(a.i for a in n.attribute if a.name == "bits") for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert sorted(bits) == [4] * 4 + [8] * 5  # o, gate/up x 2 at 4 bits; qkv, down x 2 + head at 8
    blocks = {(next(a.i for a in n.attribute if a.name == "bits"), next(a.i for a in n.attribute if a.name == "block_size"))
              for n in model.graph.node if n.op_type == "MatMulNBits"}
    assert blocks == {(4, 16), (8, 32)}  # 8-bit MatMuls keep cpu-int8's block 32: fewer scale bytes per token
    assert count_ops(model).get("GatherBlockQuantized") == 1
    assert report.facts["awq"]["groups"] == 2 * 3
    assert report.manifest.quality["perplexity_ratio"] <= 1.1
