"""The bundle's weights split into embedding, layers and head MB, read from the final graph (the Gather
on input_ids, the MatMul producing the logits), tied heads counted once; and the weight-only profile's
`lm_head` / `embeddings` fields act on an untied head the same way as on a tied one."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from edgelm.graph_roles import GraphRoles, size_split

VOCAB, HIDDEN = 4096, 64


def _graph(tied: bool, softcap: bool = False) -> onnx.ModelProto:
    """ids -> Gather(embedding) -> MatMul(layer) -> MatMul(head) [-> Div/Tanh/Mul soft-cap] -> logits."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((VOCAB, HIDDEN), dtype=np.float32), "emb"),
             numpy_helper.from_array(rng.standard_normal((HIDDEN, HIDDEN), dtype=np.float32), "layer_w")]
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["h0"], name="embed"),
             helper.make_node("MatMul", ["h0", "layer_w"], ["h1"], name="layer")]
    if tied:
        nodes.append(helper.make_node("Transpose", ["emb"], ["emb_t"], perm=[1, 0], name="t"))
        head_weight = "emb_t"
    else:
        inits.append(numpy_helper.from_array(rng.standard_normal((HIDDEN, VOCAB), dtype=np.float32), "head_w"))
        head_weight = "head_w"
    out = "raw" if softcap else "logits"
    nodes.append(helper.make_node("MatMul", ["h1", head_weight], [out], name="head"))
    if softcap:
        inits.append(numpy_helper.from_array(np.array(30.0, np.float32), "cap"))
        nodes += [helper.make_node("Div", ["raw", "cap"], ["d"]), helper.make_node("Tanh", ["d"], ["t2"]),
                  helper.make_node("Mul", ["t2", "cap"], ["logits"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, [1, 3])],
                              [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [1, 3, VOCAB])], inits)
    return helper.make_model(graph)


def test_split_of_a_tied_head_counts_the_embedding_once():
    split = size_split(_graph(tied=True))
    assert split == {"embedding_mb": round(VOCAB * HIDDEN * 4 / 1e6, 3), "layers_mb": round(HIDDEN * HIDDEN * 4 / 1e6, 3),
                     "head_mb": 0.0, "head_tied": True}


def test_split_of_an_untied_soft_capped_head():
    model = _graph(tied=False, softcap=True)
    roles = GraphRoles(model.graph)
    assert roles.head_node().name == "head" and [n.name for n in roles.embedding_nodes()] == ["embed"]
    assert roles.head_weights() == {"head_w"} and roles.embedding_weights() == {"emb"}
    assert not size_split(model)["head_tied"]


def test_split_finds_a_1x1_conv_head():
    """The static NPU graphs project with 1x1 convolutions, the head included."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((VOCAB, HIDDEN), dtype=np.float32), "emb"),
             numpy_helper.from_array(rng.standard_normal((VOCAB, HIDDEN, 1, 1), dtype=np.float32), "kernel"),
             numpy_helper.from_array(np.array([3], np.int64), "axis")]
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["h"]),
             helper.make_node("Transpose", ["h"], ["ht"], perm=[0, 2, 1]),
             helper.make_node("Unsqueeze", ["ht", "axis"], ["h4"]),
             helper.make_node("Conv", ["h4", "kernel"], ["c"], name="head"),
             helper.make_node("Squeeze", ["c", "axis"], ["c3"]),
             helper.make_node("Transpose", ["c3"], ["logits"], perm=[0, 2, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, [1, 3])],
                              [helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [1, 3, VOCAB])], inits)
    split = size_split(helper.make_model(graph))
    assert split["head_mb"] == split["embedding_mb"] == round(VOCAB * HIDDEN * 4 / 1e6, 3) and not split["head_tied"]


def test_split_follows_weight_only_quantization():
    from edgelm.config.profile import WeightOnly
    from edgelm.quant.matmul_nbits import quantize_weight_only, select_matmuls

    settings = WeightOnly(mode="weight-only", bits=4, block_size=16, symmetric=True, lm_head="quantized", embeddings="int4")
    model = _graph(tied=True, softcap=True)
    chosen, _, kept, head_quantized = select_matmuls(model, settings)
    assert head_quantized and sorted(chosen) == ["head", "layer"] and not kept
    quantized = quantize_weight_only(model, settings, chosen)
    ops = [n.op_type for n in quantized.graph.node]
    assert ops.count("MatMulNBits") == 2 and "GatherBlockQuantized" in ops
    split = size_split(quantized)
    assert not split["head_tied"] and split["head_mb"] > 0  # untied, then quantized on its own
    # 4-bit embedding + scales: about an eighth of fp32 (plus block scales)
    assert split["embedding_mb"] <= round(VOCAB * HIDDEN * 4 / 1e6 / 4, 3)

    float_head = WeightOnly(mode="weight-only", bits=4, block_size=16, symmetric=True, lm_head="float")
    for tied in (True, False):
        chosen, _, kept, head_quantized = select_matmuls(_graph(tied=tied), float_head)
        assert chosen == ["layer"] and not head_quantized  # untied: kept float by the graph, not by its name
        assert kept == ([] if tied else ["head"])


# each family once, with both head settings among them: tied heads (llama, qwen2/3, gemma3, smollm3)
# and untied ones (mistral, phi3); an int4 embedding everywhere
HEAD_SETTING = {"llama": "float", "mistral": "quantized", "qwen2": "quantized", "qwen3": "float",
                "gemma3_text": "quantized", "phi3": "float", "smollm3": "quantized"}


@pytest.mark.parametrize("family", list(HEAD_SETTING))
def test_weight_only_head_and_embedding_fields_per_family(family, family_model_dirs, tiny_recipe, tmp_path):
    """The profile's lm_head / embeddings fields act on every family's head and embedding, found by
    the graph; the split lands in the package facts, the manifest and the build summary."""
    import yaml

    from edgelm import api
    from edgelm._render import build_summary

    head = HEAD_SETTING[family]
    profile = tmp_path / "wo.yaml"
    profile.write_text(yaml.safe_dump({"name": "wo", "description": "weight-only", "provider": "CPUExecutionProvider",
                                       "quantization": {"mode": "weight-only", "bits": 8, "symmetric": True,
                                                        "lm_head": head, "embeddings": "int4"}}))
    plan = api.plan_build(profile=str(profile), recipe=tiny_recipe, model=str(family_model_dirs[family]), name=family)
    report = api.build(plan, tmp_path / family)
    model = onnx.load(str(report.output / "model.onnx"), load_external_data=False)
    roles = GraphRoles(model.graph)
    assert [n.op_type for n in roles.embedding_nodes()] == ["GatherBlockQuantized"]
    assert roles.head_node().op_type == ("MatMulNBits" if head == "quantized" else "MatMul")
    assert report.facts["quantize"]["lm_head_quantized"] == (head == "quantized")

    split = report.facts["package"]["size_split"]
    assert report.manifest.provenance["stages"]["package"]["size_split"] == split
    assert split["embedding_mb"] > 0 and split["layers_mb"] > 0
    # the int4 embedding is a copy of its own, so even a tied head now has its own (float or 8-bit) bytes
    assert not split["head_tied"] and split["head_mb"] > 0
    summary = build_summary(report)
    rows = dict(zip(summary.columns[0].cells, summary.columns[2].cells))
    assert "embedding" in rows["package"] and "layers" in rows["package"] and "head" in rows["package"]
