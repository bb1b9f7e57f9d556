"""The static QDQ pass alone (cpu-w8a8): every weight MatMul reads int8 weights through
DequantizeLinear, its activations are calibrated on real prompts, and the quantized graph still
predicts what the fp32 graph predicts."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edgelm import api
from edgelm.pipeline.stage import no_progress
from edgelm.quant.graph import weight_matmuls
from edgelm.stages.export.decoder import PARITY_TEXT, kv_shape, onnx_logits
from edgelm.stages.quantize import Quantize
from tests.conftest import run_until


@pytest.fixture(scope="module")
def quantized(tiny_model_dir, tiny_recipe, tmp_path_factory):
    plan = api.plan_build(profile="cpu-w8a8", recipe=tiny_recipe, model=str(tiny_model_dir), name="qdq")
    state = run_until(plan, tmp_path_factory.mktemp("qdq"), "fuse")
    fused = state.current_onnx
    return state, fused, Quantize().run(state, no_progress)


def test_every_weight_matmul_reads_8bit_weights_through_dequantize(quantized):
    state, fused, result = quantized
    before = weight_matmuls(onnx.load(str(fused), load_external_data=False))
    graph = onnx.load(str(state.current_onnx), load_external_data=True).graph
    stored = {"int8": onnx.TensorProto.INT8, "uint8": onnx.TensorProto.UINT8}[state.plan.profile.quantization.weight_dtype]
    int8 = {i.name for i in graph.initializer if i.data_type == stored}
    dequantized = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    quantized_weights = [n for n in graph.node if n.op_type == "MatMul" and dequantized.get(n.input[1]) in int8]
    assert result.mode == "static-qdq"
    assert len(quantized_weights) == result.details["quantized_matmuls"] == len(before) - result.details["kept_float"]
    assert result.details["quantized_matmuls"] > 0
    # activations are quantized too (W8A8): each quantized MatMul's input comes through a DequantizeLinear
    assert all(n.input[0] in dequantized for n in quantized_weights)
    scales = [numpy_helper.to_array(i) for i in graph.initializer if i.name.endswith("_scale")]
    assert scales and all(np.isfinite(s).all() and (s > 0).all() for s in scales)


def test_calibration_ran_on_the_plans_prompts(quantized):
    state, _, result = quantized
    assert result.details["calibration_source"] == "builtin"
    assert 0 < result.details["calibration_samples"] <= state.plan.calibration.samples
    assert result.details["calibration_feeds"] >= result.details["calibration_samples"]
    assert result.details["size_mb_after"] < result.details["size_mb_before"]


def test_the_quantized_graph_predicts_what_fp32_predicts(quantized):
    state, _, _ = quantized
    ids = np.asarray([state.tokenizer(PARITY_TEXT)["input_ids"][:32]], dtype=np.int64)
    kv = kv_shape(state.model.config)
    reference, _ = onnx_logits(state.reference_onnx, ids, kv)
    candidate, _ = onnx_logits(state.current_onnx, ids, kv)
    agreement = float((reference.argmax(-1) == candidate.argmax(-1)).mean())
    assert agreement >= 0.8, agreement
    assert not np.allclose(reference, candidate, atol=1e-6)  # it did quantize
