"""The Hadamard rotation pass (static W8A8): its matrices are orthogonal and int8-exact, the rotated
model computes the fp32 function, and a rotated build keeps the online rotation in float."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import yaml

from edgelm.config import load_profile
from edgelm.errors import ConfigError
from edgelm.quant.graph import weight_matmuls
from edgelm.quant.rotation import ROTATION_MODULE, hadamard_factors, online_rotation, rotation_matrix
from edgelm.stages.compress.rotate import rotate_model
from tests.conftest import _build, save_tiny_family

ROTATABLE = ("llama", "mistral", "qwen2", "qwen3", "phi3", "smollm3")


@pytest.mark.parametrize("n", [12, 20, 28, 36, 64, 76, 576, 896, 1536, 4864])
def test_hadamard_orders_of_the_shipped_families_are_exact(n):
    """SmolLM2's 576 / 1536, Qwen2.5-0.5B's 896 / 4864: Kronecker products of a Paley and a
    Sylvester matrix, each entry +-1/sqrt(order), so an int8 per-tensor scale holds them exactly."""
    left, right = hadamard_factors(n)
    assert len(left) * len(right) == n
    for factor in (left, right):
        m = len(factor)
        assert np.allclose(np.abs(factor) * np.sqrt(m), 1.0)
        assert np.allclose(factor @ factor.T, np.eye(m), atol=1e-12)


def test_orders_without_a_hadamard_fall_back_to_an_orthogonal_matrix():
    assert hadamard_factors(18) is None
    q = rotation_matrix(18, seed=0)
    assert np.allclose(q @ q.T, np.eye(18), atol=1e-12)


@pytest.mark.parametrize("n", [1536, 11008, 18])
def test_the_online_rotation_is_the_dense_rotation(n):
    rotation = online_rotation(n)
    x = torch.randn(2, 3, n)
    assert torch.allclose(rotation(x).double(), x.double() @ rotation.matrix(), atol=1e-5)
    assert torch.allclose(rotation.matrix() @ rotation.matrix().T, torch.eye(n, dtype=torch.float64), atol=1e-6)


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("rotation-families")
    return {family: save_tiny_family(root / family, family) for family in (*ROTATABLE, "gemma3_text")}


@pytest.mark.parametrize("family", ROTATABLE)
def test_the_rotated_model_keeps_the_fp32_function(family, family_dirs):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(family_dirs[family]).eval()
    with torch.no_grad():  # random biases where the family has them (Qwen2's q/k/v), so their rotation shows
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.add_(torch.randn_like(parameter) * 0.1)
    ids = torch.randint(0, model.config.vocab_size, (1, 48))
    with torch.no_grad():
        before = model(ids, use_cache=False).logits
        facts = rotate_model(model)
        after = model(ids, use_cache=False).logits
    assert (after - before).abs().max() < 1e-4
    assert facts["hidden_rotation"] == "Hadamard 64" and facts["online_rotation"] == "Hadamard 128"
    # the weights did change: the residual stream now runs rotated
    embedding = model.get_input_embeddings().weight
    assert not torch.allclose(embedding, AutoModelForCausalLM.from_pretrained(family_dirs[family]).get_input_embeddings().weight)


def test_post_norm_families_are_left_unrotated_with_the_reason(family_dirs):
    """Gemma 3 normalises each branch's output before the residual add: no rotation folds, so the
    stage records why and leaves the model as it is (a profile's rotation applies where it can)."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from edgelm.stages.compress.rotate import Rotate

    model = AutoModelForCausalLM.from_pretrained(family_dirs["gemma3_text"]).eval()
    with pytest.raises(ValueError, match="post-norms"):
        rotate_model(model)
    before = {name: p.clone() for name, p in model.state_dict().items()}
    state = SimpleNamespace(plan=SimpleNamespace(profile=load_profile("npu-qdq")), model=model)
    result = Rotate().run(state, lambda *args: None)
    assert result.skipped.startswith("not rotated: gemma3_text normalises each residual branch")
    assert all(torch.equal(before[name], p) for name, p in model.state_dict().items())


def test_rotation_and_smoothquant_together_is_a_named_error(tmp_path):
    from edgelm.config.profile import StaticQDQ

    with pytest.raises(ValueError, match="smoothquant_alpha: null"):
        StaticQDQ(mode="static-qdq", rotation="hadamard", smoothquant_alpha=0.5)
    data = load_profile("cpu-w8a8").model_dump(mode="json")
    data["quantization"].update(rotation="hadamard", smoothquant_alpha=0.5)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="quantization"):
        load_profile(str(path))


def _rotation_matmuls(graph) -> list:
    """The online rotation's MatMuls: a float constant named after the rotation module."""
    constants = {i.name for i in graph.initializer if ROTATION_MODULE in i.name}
    return [n for n in graph.node if n.op_type == "MatMul" and any(name in constants for name in n.input)]


def _rotated_profile(folder, name: str = "cpu-w8a8"):
    data = load_profile(name).model_dump(mode="json")
    data["name"] = f"{name}-rotated"
    data["quantization"].update(rotation="hadamard", smoothquant_alpha=None, keep_float=[])
    path = folder / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_rotated_w8a8_build_quantizes_every_weight_matmul_and_keeps_the_rotation_float(
        tiny_model_dir, tiny_recipe, tmp_path):
    report = _build(tiny_model_dir, tiny_recipe, str(_rotated_profile(tmp_path)), tmp_path / "rotated")
    rotate = report.facts["rotate"]
    assert rotate["untied_head"] is True and rotate["parity"] < 1e-4
    model = onnx.load(str(report.output / "model.onnx"), load_external_data=False)
    graph = model.graph
    dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    rotations = _rotation_matmuls(graph)
    assert len(rotations) == 2  # one per layer: the tiny model's 128 is a Sylvester order, a single factor
    assert not any(name in dequantized for n in rotations for name in n.input)  # float in, float constant
    assert report.facts["quantize"]["kept_float"] == 0
    assert len(weight_matmuls(model)) == 0  # every weight MatMul now reads its weight through DequantizeLinear


def test_a_rotated_npu_build_runs_the_online_rotation_in_its_static_graphs(tiny_model_dir, tiny_recipe, tmp_path):
    from tests.conftest import npu_profile

    data = yaml.safe_load(npu_profile(tmp_path).read_text())
    data["name"] = "npu-qdq-rotated"
    data["quantization"].update(rotation="hadamard", smoothquant_alpha=None)
    path = tmp_path / "npu-qdq-rotated.yaml"
    path.write_text(yaml.safe_dump(data))
    report = _build(tiny_model_dir, tiny_recipe, str(path), tmp_path / "npu-rotated")
    assert report.facts["rotate"]["parity"] < 1e-4
    for graph_file in sorted(report.output.glob("*.onnx")):
        graph = onnx.load(str(graph_file), load_external_data=False).graph
        constants = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear" and ROTATION_MODULE in n.input[0]}
        # the rotation's constant reaches its MatMul through DequantizeLinear: QDQ on every op
        rotations = [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in constants]
        assert len(rotations) == 2, graph_file.name


def test_a_rotated_weight_only_build_keeps_the_rotation_in_float(tiny_model_dir, tiny_recipe, tmp_path):
    """cpu-int8 with rotation: every projection is a MatMulNBits, the online rotation a float MatMul,
    `edgelm inspect` shows the rotation, and the bundle still answers as its unrotated build does."""
    import edgelm_runtime as er

    data = load_profile("cpu-int8").model_dump(mode="json")
    data["name"], data["quantization"]["rotation"] = "cpu-int8-rotated", "hadamard"
    path = tmp_path / "cpu-int8-rotated.yaml"
    path.write_text(yaml.safe_dump(data))
    report = _build(tiny_model_dir, tiny_recipe, str(path), tmp_path / "int8-rotated")
    graph = onnx.load(str(report.output / "model.onnx"), load_external_data=False).graph
    assert sum(n.op_type == "MatMulNBits" for n in graph.node) == report.facts["quantize"]["quantized_matmuls"] > 0
    assert len(_rotation_matmuls(graph)) == 2
    from tests.integration.test_cli import _run

    shown = _run("inspect", str(report.output)).output  # the manifest's rotate record reads back as a row
    assert "rotate" in shown and "Hadamard 64 (residual)" in shown
    data["name"], data["quantization"]["rotation"] = "cpu-int8-unrotated", "none"
    path.write_text(yaml.safe_dump(data))
    plain = _build(tiny_model_dir, tiny_recipe, str(path), tmp_path / "int8-plain")
    prompt = "The quick brown fox"
    rotated_answer = er.load_bundle(report.output).generate(prompt, max_new_tokens=8)
    assert rotated_answer == er.load_bundle(plain.output).generate(prompt, max_new_tokens=8)
