"""The tiny model built with every built-in profile: the profile's required fusions are in the
manifest's counts, its quantization left its op types in the graph, and the bundle runs (on the
CPU provider when the profile's own is not on this machine, as the build's quality check does)."""

from __future__ import annotations

import collections

import onnx
import pytest

import edgelm_runtime as er
from edgelm.config import list_profiles

PROFILES = {p.name: p for p in list_profiles()}


def _graph(bundle):
    model = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
    return model, collections.Counter(node.op_type for node in model.graph.node)


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_tiny_model_builds_with_every_profile(name, tiny_model_dir, tiny_recipe, tmp_path):
    from edgelm import api

    profile = PROFILES[name]
    # a static profile's KV window (512 for npu-qdq) must fit the context; the tiny recipe sets 256
    overrides = api.BuildOverrides(max_seq_len=profile.export.kv_window) if profile.export.static_shapes else None
    plan = api.plan_build(profile=name, recipe=tiny_recipe, model=str(tiny_model_dir), name=name, overrides=overrides)
    report = api.build(plan, tmp_path / name)
    manifest = report.manifest
    assert manifest.provider == profile.provider
    assert all(manifest.fusions.get(op, 0) > 0 for op in profile.fusions.required), manifest.fusions
    model, ops = _graph(report.output)
    mode = profile.quantization.mode
    if mode == "weight-only":
        bits = {a.i for n in model.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"}
        assert ops["MatMulNBits"] > 0 and profile.quantization.bits in bits
    elif mode == "static-qdq":
        assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0
    elif mode == "float16":
        floats = {init.data_type for init in model.graph.initializer if init.data_type in (onnx.TensorProto.FLOAT,
                                                                                         onnx.TensorProto.FLOAT16)}
        assert floats == {onnx.TensorProto.FLOAT16} and manifest.kv.dtype == "float16"
    else:
        assert ops["MatMulNBits"] == 0 and ops["QuantizeLinear"] == 0 and manifest.kv.dtype == "float32"
    if profile.export.static_shapes:
        _assert_static(report.output, manifest, profile)
    assert manifest.quality["measured_on"] in ("CPUExecutionProvider", profile.provider)
    llm = er.load_bundle(report.output, provider=manifest.quality["measured_on"])
    assert len(list(llm.generate_tokens(llm.tokenizer.encode("The weather"), max_new_tokens=4))) >= 1


def _assert_static(bundle, manifest, profile):
    """Both graphs: every dimension fixed (inputs, outputs and every inferred intermediate), every op
    in the profile's list, QDQ on every op (no float MatMul or Conv left), and the weights stored once."""
    from edgelm.stages.check.device import dynamic_tensors, op_counts

    assert manifest.static.prefill_len == profile.export.prefill_len
    assert manifest.max_seq_len == manifest.static.kv_window == profile.export.kv_window
    for file in (manifest.model_file, manifest.static.decode_model_file):
        graph = onnx.load(str(bundle / file), load_external_data=True)
        assert dynamic_tensors(graph) == []
        assert set(op_counts(graph)) <= set(profile.allowed_ops)
        produced_by = {out: node.op_type for node in graph.graph.node for out in node.output}
        for node in graph.graph.node:
            if node.op_type in ("Conv", "MatMul", "Softmax", "RMSNormalization"):
                assert all(produced_by.get(i) == "DequantizeLinear" for i in node.input if i), node.name
        seq = manifest.static.prefill_len if file == manifest.model_file else 1
        shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in graph.graph.input}
        assert shapes["input_ids"] == [1, seq] and shapes["attention_bias"] == [1, 1, seq, manifest.static.kv_window + seq]
    assert not (bundle / "decode.onnx.data").exists()  # every decode weight points into model.onnx.data


def test_gpu_bundle_on_a_machine_without_a_gpu(tiny_model_dir, tiny_recipe, tmp_path):
    """No CUDA here: loading as built is a clear error that says how to run it on the CPU instead;
    with --provider it runs and its greedy tokens match the fp32 bundle's (fp16 on a tiny model)."""
    import onnxruntime

    from edgelm import api
    from tests.integration.test_cli import _assert_clean_error, _run

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this machine has CUDA: the fallback path is not taken")
    gpu = api.build(api.plan_build(profile="gpu-fp16", recipe=tiny_recipe, model=str(tiny_model_dir), name="gpu"),
                    tmp_path / "gpu").output
    fp32 = api.build(api.plan_build(profile="cpu-fp32", recipe=tiny_recipe, model=str(tiny_model_dir), name="fp32"),
                     tmp_path / "fp32").output
    _assert_clean_error(_run("generate", str(gpu), "The weather"), "CUDAExecutionProvider is not available",
                        "--provider CPUExecutionProvider")
    on_cpu = _run("generate", str(gpu), "The weather", "-n", "6", "--provider", "CPUExecutionProvider")
    reference = _run("generate", str(fp32), "The weather", "-n", "6")
    assert on_cpu.exit_code == 0 and on_cpu.output == reference.output
    from edgelm_runtime.bench import bench

    result = bench([gpu], threads=1, repeats=1, warmup=0, decode_tokens=4, provider="CPUExecutionProvider")
    assert result["bundles"][0]["decode_tokens_per_s"] > 0
