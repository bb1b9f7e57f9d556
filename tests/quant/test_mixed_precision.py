"""Mixed precision: restored MatMuls really run in fp32, and the search keeps the fewest groups."""

from __future__ import annotations

import onnx
import pytest

from edgelm.quant.mixed_precision import ranked_groups, search_prefix, unpacked


@pytest.mark.parametrize("threshold", [0, 1, 3, 5, 8])
def test_search_prefix_finds_the_smallest_passing_k(threshold):
    tried = []

    def passes(k):
        tried.append(k)
        return k >= threshold

    assert search_prefix(passes, 8) == threshold
    assert len(tried) <= 8


def test_search_prefix_reports_impossible():
    assert search_prefix(lambda k: False, 5) is None


def test_groups_share_input_and_rank_by_outliers():
    candidates = {"a": "layers.0.self_attn.q_proj", "b": "layers.0.self_attn.k_proj", "c": "layers.0.mlp.down_proj",
                  "d": "layers.1.mlp.down_proj"}
    ratios = {"layers.0.self_attn.q_proj": 5.0, "layers.0.self_attn.k_proj": 5.0,
              "layers.0.mlp.down_proj": 90.0, "layers.1.mlp.down_proj": 30.0}
    assert ranked_groups(candidates, ratios) == [["c"], ["d"], ["a", "b"]]


def test_auto_mixed_precision_meets_a_strict_gate_with_fp32_nodes(tiny_model_dir, tmp_path):
    from edgelm import api
    from edgelm.config.profile import load_profile

    profile = load_profile("cpu-w8a8").model_dump()
    profile["name"] = "cpu-int8-auto"
    profile["quantization"].update(keep_float=[], mixed_precision="auto", smoothquant_alpha=0.5, rotation="none")
    profile["quality"] = {"max_kl_divergence": 1e-6}
    path = tmp_path / "auto.yaml"
    import yaml

    path.write_text(yaml.safe_dump(profile))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("max_seq_len: 256\ncalibration: {samples: 4, decode_steps: 2, max_prompt_tokens: 32}\n"
                      "quality: {windows: 2, window_len: 64}\n")
    report = api.build(api.plan_build(profile=str(path), recipe=recipe, model=str(tiny_model_dir), name="auto"), tmp_path / "out")
    facts = report.facts["quantize"]
    chosen = facts["mixed_precision"]
    assert chosen["fp32_groups"] >= 1 and chosen["trials"][0]["fp32_groups"] == 0
    assert facts["kept_float"] == len(chosen["fp32_modules"])
    assert report.manifest.quality["kl_divergence"] <= 1e-6
    model = onnx.load(str(report.output / "model.onnx"), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    float_matmuls = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    quantized_matmuls = [n for n in model.graph.node if n.op_type == "MatMul"
                         and getattr(producers.get(n.input[1]), "op_type", "") == "DequantizeLinear"]
    assert len(float_matmuls) >= facts["kept_float"]  # the tied LM head may add one float MatMul
    assert len(quantized_matmuls) == facts["quantized_matmuls"]


def test_module_paths_match_the_activation_statistics(tiny_int8_report):
    from edgelm.quant.graph import module_path

    model = onnx.load(str(tiny_int8_report.output / "model.onnx"), load_external_data=False)
    paths = {module_path(n) for n in model.graph.node if n.op_type == "MatMul" and n.name.startswith("node_linear")}
    assert "layers.0.self_attn.qkv_proj" in paths and "layers.1.mlp.gate_up_proj" in paths
    # the Smooth stage keys its outlier ratios by PyTorch module; each packed MatMul finds the
    # module whose input it shares, so the ranking sees real numbers
    shared_input = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}
    worst = {path.rsplit(".", 1)[0] + "." + shared_input.get(path.rsplit(".", 1)[1], path.rsplit(".", 1)[1])
             for path in tiny_int8_report.facts["smooth"]["worst_inputs"]}
    assert worst <= {unpacked(p) for p in paths}


def test_sensitivity_ranks_the_group_that_quantizes_worst_first(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from edgelm.config.profile import StaticQDQ
    from edgelm.stages.compress.sensitivity import measure_sensitivity
    from edgelm.stages.compress.smooth import collect_input_stats

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    samples = [[5, 17, 42, 99, 7, 3, 250, 11] * 4, [8, 1, 33, 120, 64, 2] * 5]
    stats = collect_input_stats(model, samples)
    ranges = {name: (entry["min"], entry["max"]) for name, entry in stats.items()}
    # a range 1000x too wide leaves a handful of int8 levels for layer 1's gate/up input
    low, high = ranges["layers.1.mlp.gate_proj"]
    ranges["layers.1.mlp.gate_proj"] = (low * 1000, high * 1000)
    settings = StaticQDQ(mode="static-qdq", weight_dtype="uint8")
    scores = measure_sensitivity(model, samples, ranges, settings)
    assert set(scores) == {f"layers.{i}.{g}" for i in range(2) for g in
                           ("self_attn.qkv", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert max(scores, key=scores.get) == "layers.1.mlp.gate_proj"
    assert all(kl >= 0 for kl in scores.values())
