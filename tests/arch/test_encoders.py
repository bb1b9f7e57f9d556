"""Encoder builds (BERT, RoBERTa, DistilBERT) for each task, checked through edgelm-runtime against
the PyTorch model they were built from: the task read from the checkpoint, a sentence-transformers
folder's pooling kept, parity, the fusions, each profile's encoder scheme, a LoRA classifier with
its modules_to_save head merged, `edgelm eval`, and every bad input as one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

import edgelm_runtime as er
from edgelm import api
from edgelm.errors import ConfigError, EdgelmError, QualityGateError
from tests.conftest import ENCODER_FAMILIES, save_tiny_encoder

TASKS = ("feature-extraction", "sequence-classification", "token-classification")
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Edge devices run small models offline, on a phone.", "ok"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("encoder-sources")
    return {(family, task): save_tiny_encoder(root / f"{family}-{task}", family, task,
                                              sentence_transformers=task == "feature-extraction")
            for family in ENCODER_FAMILIES for task in TASKS}


@pytest.fixture(scope="module")
def built(sources, tmp_path_factory) -> dict[tuple[str, str], Path]:
    root = tmp_path_factory.mktemp("encoder-bundles")
    return {key: api.build(api.plan_build(profile="cpu-fp32", model=str(source), name="-".join(key)),
                           root / "-".join(key)).output for key, source in sources.items()}


def _torch(source: Path, task: str):
    import transformers

    head = {"feature-extraction": "AutoModel", "sequence-classification": "AutoModelForSequenceClassification",
            "token-classification": "AutoModelForTokenClassification"}[task]
    return getattr(transformers, head).from_pretrained(source).eval(), transformers.AutoTokenizer.from_pretrained(source)


@pytest.mark.parametrize("family", ENCODER_FAMILIES)
def test_embeddings_equal_sentence_transformers_pooling(family, sources, built):
    import torch

    model, tokenizer = _torch(sources[family, "feature-extraction"], "feature-extraction")
    encoded = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**encoded).last_hidden_state
    mask = encoded["attention_mask"][..., None].float()
    expected = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    bundle = er.load_bundle(built[family, "feature-extraction"])
    assert bundle.manifest.encoder.pooling == "mean" and bundle.manifest.encoder.normalize  # from modules.json
    assert bundle.manifest.encoder.max_length == 64  # sentence_bert_config.json's max_seq_length
    np.testing.assert_allclose(bundle.embed(TEXTS), expected, atol=1e-4)


@pytest.mark.parametrize("family", ENCODER_FAMILIES)
def test_classifier_probabilities_equal_pytorch_softmax(family, sources, built):
    import torch

    model, tokenizer = _torch(sources[family, "sequence-classification"], "sequence-classification")
    with torch.no_grad():
        expected = torch.softmax(model(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits, -1).numpy()
    results = er.load_bundle(built[family, "sequence-classification"]).classify(TEXTS)
    assert [r.label for r in results] == [model.config.id2label[int(i)] for i in expected.argmax(1)]
    np.testing.assert_allclose([[r.scores[label] for label in ("negative", "positive")] for r in results], expected,
                               atol=1e-4)


@pytest.mark.parametrize("family", ENCODER_FAMILIES)
def test_token_logits_equal_pytorch_and_entities_slice_the_text(family, sources, built):
    import torch

    model, tokenizer = _torch(sources[family, "token-classification"], "token-classification")
    encoded = tokenizer(TEXTS, padding=True, return_tensors="np")
    with torch.no_grad():
        expected = model(**{k: torch.from_numpy(v) for k, v in encoded.items()}).logits.numpy()
    bundle = built[family, "token-classification"]
    session = er.load_bundle(bundle)
    feeds = {name: encoded.get(name, np.zeros_like(encoded["input_ids"])).astype(np.int64)
             for name in session.manifest.encoder.inputs}
    import onnxruntime as ort

    got = ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    real = encoded["attention_mask"].astype(bool)
    np.testing.assert_allclose(got[real], expected[real], atol=1e-4)
    for text, entities in zip(TEXTS, session.tag(TEXTS)):
        assert all(text[e.start:e.end] == e.text and e.label in ("PER", "LOC") for e in entities)


def test_manifest_records_task_inputs_fusions_and_quality(built):
    manifest = er.read_manifest(built["bert", "token-classification"])
    assert manifest.kv is None and manifest.task == "token-classification"
    assert manifest.encoder.labels == ("O", "B-PER", "I-PER", "B-LOC", "I-LOC")
    assert manifest.encoder.inputs == ("input_ids", "attention_mask", "token_type_ids")  # BERT: two token types
    assert manifest.fusions["MultiHeadAttention"] == 2 and manifest.fusions["SkipLayerNormalization"] == 4
    assert manifest.quality["entity_f1"] == 1.0 and manifest.plan["task"] is None  # read from the checkpoint
    stages = manifest.provenance["stages"]
    assert stages["encoder_export"]["max_abs_diff"] < 1e-4 and stages["encoder_export"]["attention"] == 2
    assert er.read_manifest(built["distilbert", "feature-extraction"]).encoder.inputs == ("input_ids", "attention_mask")
    roberta = er.read_manifest(built["roberta", "feature-extraction"]).encoder
    assert roberta.max_length == 64 and roberta.pad_token_id == 1


@pytest.mark.parametrize("profile, op", [("cpu-int8", "MatMulInteger"), ("cpu-w8a8", "DequantizeLinear"),
                                         ("cpu-int4", "MatMulNBits"), ("gpu-fp16", None), ("npu-qdq", "QuantizeLinear")])
def test_each_profile_quantizes_with_its_encoder_scheme(profile, op, sources, tmp_path):
    recipe = tmp_path / "random-weights.yaml"  # retrieval on a random model's embeddings is near-ties only
    recipe.write_text("quality: {min_retrieval_agreement: 0.5, min_mean_cosine: 0.9}\n")
    report = api.build(api.plan_build(profile=profile, recipe=recipe, model=str(sources["bert", "feature-extraction"]),
                                      name="q"), tmp_path / profile)
    graph = onnx.load(str(report.output / "model.onnx"), load_external_data=False).graph
    if op:
        assert any(node.op_type == op for node in graph.node)
    else:  # fp16 weights, fp32 at the graph's edge
        assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in graph.initializer)
    quality = report.manifest.quality
    assert quality["mean_cosine"] >= report.manifest.plan["quality"]["min_mean_cosine"]
    bundle = er.load_bundle(report.output, provider="CPUExecutionProvider")
    assert bundle.embed(TEXTS).shape == (3, 32)
    if profile == "npu-qdq":  # one fixed shape, plain ops only (the device stage checked every op)
        assert bundle.manifest.encoder.static_seq_len == 64 and report.manifest.provenance["stages"]["device"]["graphs"]
        assert all(d.dim_value == (1, 64)[i] for v in graph.input for i, d in enumerate(v.type.tensor_type.shape.dim))


def test_lora_classifier_with_its_head_merges_into_a_bare_encoder(sources, tmp_path):
    """A SEQ_CLS adapter over a sentence-transformers folder: the task comes from the adapter,
    the labels from its config.json, the head from modules_to_save."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base = sources["bert", "feature-extraction"]
    torch.manual_seed(1)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=3, id2label={0: "a", 1: "b", 2: "c"})
    peft_model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"],
                                                  init_lora_weights=False))
    adapter = tmp_path / "topics"
    peft_model.save_pretrained(adapter)
    model.config.save_pretrained(adapter)  # id2label beside the adapter
    tokenizer = AutoTokenizer.from_pretrained(base)
    with torch.no_grad():
        expected = torch.softmax(peft_model(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits, -1).numpy()
    report = api.build(api.plan_build(profile="cpu-fp32", model=str(base), adapters=[str(adapter)], name="topics"),
                       tmp_path / "bundle")
    assert report.manifest.encoder.task == "sequence-classification" and report.manifest.encoder.labels == ("a", "b", "c")
    assert report.manifest.adapters[0]["merge_max_abs_diff"] < 1e-4
    got = er.load_bundle(report.output).classify(TEXTS)
    np.testing.assert_allclose([[r.scores[x] for x in "abc"] for r in got], expected, atol=1e-4)


def test_eval_reports_the_encoder_metrics(built, sources):
    report = api.evaluate(built["bert", "sequence-classification"], check=False)
    assert report.result["task"] == "sequence-classification" and report.result["label_agreement"] == 1.0
    assert report.passed


def test_a_missed_encoder_gate_fails_the_build_and_writes_nothing(sources, tmp_path):
    recipe = tmp_path / "strict.yaml"
    recipe.write_text("quality: {min_mean_cosine: 0.9999999}\n")
    plan = api.plan_build(profile="cpu-int4", recipe=recipe, model=str(sources["roberta", "feature-extraction"]), name="x")
    with pytest.raises(QualityGateError, match="mean cosine .* < min_mean_cosine 0.9999999"):
        api.build(plan, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_encoder_inputs_fail_in_one_line(sources, tiny_model_dir, tmp_path):
    bare = sources["bert", "feature-extraction"]
    cases = [
        (dict(profile="cpu-int8", model=str(bare), overrides=api.BuildOverrides(task="token-classification")),
         "needs a classification head"),
        (dict(profile="npu-qdq", model=str(sources["modernbert", "feature-extraction"])),
         "modernbert cannot build for npu-qdq yet: sliding-window layers"),
        (dict(profile="cpu-int8", model=str(tiny_model_dir), overrides=api.BuildOverrides(task="feature-extraction")),
         "encoder architecture 'llama' is not supported"),
        (dict(profile="cpu-int8", model=str(bare), overrides=api.BuildOverrides(prune_mlp=0.1)), "encoder builds do not prune"),
    ]
    for kwargs, message in cases:
        with pytest.raises(EdgelmError, match=message) as caught:
            api.build(api.plan_build(name="x", **kwargs), tmp_path / "never")
        assert "\n" not in str(caught.value)
        assert not (tmp_path / "never").exists()
    config = json.loads((sources["bert", "sequence-classification"] / "config.json").read_text())
    masked = tmp_path / "masked-lm"
    masked.mkdir()
    for file in sources["bert", "sequence-classification"].iterdir():
        (masked / file.name).write_bytes(file.read_bytes())
    (masked / "config.json").write_text(json.dumps({**config, "architectures": ["BertForMaskedLM"]}))
    with pytest.raises(ConfigError, match="do not say which task"):
        api.build(api.plan_build(profile="cpu-int8", model=str(masked), name="x"), tmp_path / "never")
