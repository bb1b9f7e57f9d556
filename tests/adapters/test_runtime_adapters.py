"""Runtime LoRA adapters: one base bundle whose adapters switch per call equal each adapter merged."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import edgelm_runtime as er

PROMPT = "The quick brown fox jumps over the lazy dog and runs home"


def _ids(llm) -> list[int]:
    return llm.tokenizer.encode(PROMPT, True)


def _step_logits(llm, ids: list[int]) -> np.ndarray:
    """The last position's logits through a stepper (IO binding: the generation path)."""
    stepper = llm.decoder.stepper(len(ids) + 1)
    return np.array(stepper.feed(np.asarray(ids, dtype=np.int64)))


@pytest.mark.parametrize("name", ["sentiment", "tone"])
def test_fp32_runtime_adapter_equals_merged_build(name, runtime_bundles, merged_bundles):
    runtime, merged = er.load_bundle(runtime_bundles["cpu-fp32"]), er.load_bundle(merged_bundles[name])
    ids = _ids(merged)
    expected = merged.logits(ids)
    assert np.abs(runtime.logits(ids, adapter=name) - expected).max() < 1e-4
    assert np.abs(runtime.logits(ids) - expected).max() > 1e-2  # the adapter does change the model
    # the generation path (IO binding), where onnxruntime ignores a RunOptions' adapter
    assert np.abs(_step_logits(runtime.with_adapter(name), ids) - expected[-1]).max() < 1e-4
    assert runtime.generate(PROMPT, max_new_tokens=8, adapter=name) == merged.generate(PROMPT, max_new_tokens=8)
    assert runtime.score("Once", [" upon", " a"], adapter=name) == pytest.approx(merged.score("Once", [" upon", " a"]), abs=1e-4)


def test_quantized_runtime_adapters_pass_the_gates(runtime_bundles, merged_bundles):
    manifest = er.read_manifest(runtime_bundles["cpu-int8"])
    plan = manifest.plan
    assert plan["profile"]["quantization"]["rotation"] == "none"  # turned off: adapters would need rotating too
    graph = onnx.load(str(runtime_bundles["cpu-int8"] / "model.onnx"), load_external_data=False).graph
    lora = [n for n in graph.node if n.name.startswith("lora/")]
    assert {n.op_type for n in lora if n.op_type == "MatMul"} == {"MatMul"} and "MatMulNBits" in {n.op_type for n in graph.node}
    assert all(n.op_type != "MatMulNBits" for n in lora)
    lora_a = next(i for i in graph.input if i.name.endswith(".lora_A"))
    assert lora_a.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16  # stored small on a quantized base
    assert lora_a.type.tensor_type.shape.dim[1].dim_param  # symbolic rank: any rank fits
    llm = er.load_bundle(runtime_bundles["cpu-int8"])
    for entry in manifest.runtime_adapters:
        assert entry.quality["perplexity_ratio"] <= plan["quality"]["max_perplexity_ratio"]
        assert entry.quality["top1_agreement"] >= plan["quality"]["min_top1_agreement"]
        assert entry.quality["logit_shift"] > 0.1 * entry.quality["merged_logit_shift"]
        merged = er.load_bundle(merged_bundles[entry.name])
        ids = _ids(merged)
        assert np.abs(llm.logits(ids, adapter=entry.name) - merged.logits(ids)).max() < 0.05


def test_switching_and_no_adapter_is_base(runtime_bundles, tiny_bundle):
    llm, base = er.load_bundle(runtime_bundles["cpu-fp32"]), er.load_bundle(tiny_bundle)
    ids = _ids(base)
    assert llm.adapters == ["sentiment", "tone"]
    own = {name: llm.logits(ids, adapter=name) for name in llm.adapters}
    assert np.abs(own["sentiment"] - own["tone"]).max() > 1e-2
    for name in ["tone", "sentiment", "tone", None, "sentiment"]:
        got = llm.with_adapter(name).logits(ids)
        expected = base.logits(ids) if name is None else own[name]
        assert np.abs(got - expected).max() < 1e-4, name
    assert np.abs(llm.logits(ids) - base.logits(ids)).max() < 1e-4  # no adapter: the base model
    assert np.abs(_step_logits(llm, ids) - base.logits(ids)[-1]).max() < 1e-4
    view = llm.with_adapter("tone")
    assert view is llm.with_adapter("tone") and view.with_adapter(None) is llm and view.adapter == "tone"
    assert view.decoder._session is llm.decoder._session  # a view, not a second session


def test_unknown_adapter_is_one_line(runtime_bundles):
    llm = er.load_bundle(runtime_bundles["cpu-fp32"])
    with pytest.raises(er.GenerationError) as caught:
        llm.generate("hi", adapter="nope")
    assert "no adapter 'nope'" in caught.value.message and "sentiment, tone" in caught.value.message
    assert "\n" not in caught.value.message


def test_tampered_adapter_file_is_refused(runtime_bundles, tmp_path):
    import shutil

    copy = tmp_path / "bundle"
    shutil.copytree(runtime_bundles["cpu-fp32"], copy)
    path = copy / "adapters" / "tone.onnx_adapter"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    llm = er.load_bundle(copy)  # sizes are checked at load, hashes when an adapter is first used
    with pytest.raises(er.BundleError) as caught:
        llm.with_adapter("tone")
    assert "tone.onnx_adapter (adapter 'tone') sha256 does not match" in caught.value.message
    with pytest.raises(er.BundleError, match="sha256 does not match"):
        er.verify_bundle(copy)


@pytest.mark.parametrize("file,fragment", [("../outside.onnx_adapter", "leaves the bundle folder"),
                                           ("adapters/missing.onnx_adapter", "is not listed in files")])
def test_adapter_path_leaving_the_bundle_is_refused(file, fragment, runtime_bundles, tmp_path):
    import shutil

    copy = tmp_path / "bundle"
    shutil.copytree(runtime_bundles["cpu-fp32"], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["runtime_adapters"][0]["file"] = file
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(er.BundleError) as caught:
        er.load_bundle(copy)
    assert fragment in caught.value.message and "runtime_adapters.0.file" in caught.value.message


def test_manifest_section_is_validated(runtime_bundles):
    data = json.loads((runtime_bundles["cpu-fp32"] / "manifest.json").read_text())
    data["runtime_adapters"].append(dict(data["runtime_adapters"][0]))
    with pytest.raises(er.BundleError, match="runtime_adapters.2.name: duplicate adapter name 'sentiment'"):
        er.Manifest.from_dict(data)
    data["runtime_adapters"] = [{**data["runtime_adapters"][0], "rank": "8"}]
    with pytest.raises(er.BundleError, match="runtime_adapters.0.rank: expected int"):
        er.Manifest.from_dict(data)


def test_stage_records_read_back(runtime_bundles):
    from edgelm.pipeline.results import RESULT_TYPES, from_record

    stages = er.read_manifest(runtime_bundles["cpu-int8"]).provenance["stages"]
    assert set(stages) <= set(RESULT_TYPES)
    for name, record in stages.items():
        assert from_record(name, record).record() == {k: v for k, v in record.items() if k != "seconds"}, name
    adapters = from_record("adapters", stages["adapters"])
    assert "2 kept for run time: sentiment, tone (rotation off" in adapters.note()
    assert "sentiment: ppl x1.0" in from_record("adapter-files", stages["adapter-files"]).note()
