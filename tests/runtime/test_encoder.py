"""Encoder bundles: embed() is the PyTorch model's pooled embedding, classify() its softmax, tag()
transformers' token-classification pipeline; long and bad input fail (or truncate) in one line."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

import edgelm_runtime as er
from edgelm_runtime.bundle import MANIFEST_FILE
from tests.encoder_bundles import encoder_bundle, source_dir

TEXTS = ["Hello, world!", "", "A much longer sentence about the weather in Paris and the trains to London.",
         "Short one.", "The quick brown fox jumps over the lazy dog, twice, and then naps."]
SENTENCES = ["John Smith lives in Paris, France.", "The quick brown fox jumps over the lazy dog.",
             "Angela Merkel met Emmanuel Macron in Berlin-Mitte yesterday!", "naïve café owners in São Paulo"]
LONG = "the weather in paris is nice today " * 40


def torch_embeddings(source: Path, texts: list[str], pooling: str = "mean", normalize: bool = True,
                     max_length: int | None = None) -> np.ndarray:
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer, model = AutoTokenizer.from_pretrained(source), AutoModel.from_pretrained(source).eval()
    batch = tokenizer(texts, padding=True, truncation=max_length is not None, max_length=max_length,
                      return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    if pooling == "cls":
        pooled = hidden[:, 0]
    elif pooling == "max":
        pooled = hidden.masked_fill(mask == 0, -1e9).max(dim=1).values
    else:
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return (torch.nn.functional.normalize(pooled, dim=-1) if normalize else pooled).numpy()


@pytest.fixture(scope="module")
def embedder(tiny_encoder_bundles: dict[str, Path]) -> er.EncoderModel:
    return er.load_bundle(tiny_encoder_bundles["feature-extraction"], threads=1)


@pytest.fixture(scope="module")
def classifier(tiny_encoder_bundles: dict[str, Path]) -> er.EncoderModel:
    return er.load_bundle(tiny_encoder_bundles["sequence-classification"], threads=1)


@pytest.fixture(scope="module")
def tagger(tiny_encoder_bundles: dict[str, Path]) -> er.EncoderModel:
    return er.load_bundle(tiny_encoder_bundles["token-classification"], threads=1)


def source(model: er.EncoderModel) -> Path:
    return source_dir(model.path.parent, "bert", model.task)


def test_load_bundle_opens_an_encoder(embedder: er.EncoderModel) -> None:
    assert isinstance(embedder, er.EncoderModel)
    assert (embedder.task, embedder.dim, embedder.labels) == ("feature-extraction", 32, ())


def test_embed_equals_the_pytorch_pooled_normalised_embedding(embedder: er.EncoderModel) -> None:
    vectors = embedder.embed(TEXTS, batch_size=2)  # several batches, sorted by length and put back
    assert vectors.shape == (len(TEXTS), 32) and vectors.dtype == np.float32
    np.testing.assert_allclose(vectors, torch_embeddings(source(embedder), TEXTS), atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_padding_does_not_change_an_embedding(embedder: er.EncoderModel) -> None:
    batch = embedder.embed(TEXTS)
    for index, text in enumerate(TEXTS):
        alone = embedder.embed(text)
        assert alone.shape == (1, 32)
        np.testing.assert_allclose(alone[0], batch[index], atol=1e-5)


@pytest.mark.parametrize("pooling", ["cls", "max"])
def test_other_poolings_match_pytorch(tiny_encoder_bundles: dict[str, Path], pooling: str) -> None:
    root = tiny_encoder_bundles["feature-extraction"].parent
    model = er.load_bundle(encoder_bundle(root, "bert", "feature-extraction", pooling=pooling, normalize=False,
                                          name=f"bert-{pooling}"), threads=1)
    expected = torch_embeddings(source_dir(root, "bert", "feature-extraction"), TEXTS, pooling, normalize=False)
    np.testing.assert_allclose(model.embed(TEXTS, batch_size=3), expected, atol=1e-4)


@pytest.mark.parametrize("family", ["roberta", "distilbert"])
def test_other_families_embed_as_pytorch_does(tmp_path_factory: pytest.TempPathFactory, family: str) -> None:
    root = tmp_path_factory.mktemp(family)
    model = er.load_bundle(encoder_bundle(root, family, "feature-extraction"), threads=1)
    expected = torch_embeddings(source_dir(root, family, "feature-extraction"), TEXTS)
    np.testing.assert_allclose(model.embed(TEXTS, batch_size=2), expected, atol=1e-4)


def test_static_sequence_length_pads_every_batch_to_it(tiny_encoder_bundles: dict[str, Path],
                                                        embedder: er.EncoderModel,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    root = tiny_encoder_bundles["feature-extraction"].parent
    static = er.load_bundle(encoder_bundle(root, "bert", "feature-extraction", static_seq_len=16, name="bert-s16"),
                            threads=1)
    short = ["Hello, world!", "Short one.", ""]
    np.testing.assert_allclose(static.embed(short), embedder.embed(short), atol=1e-5)
    with caplog.at_level(logging.WARNING):
        cut = static.embed([LONG])
    expected = torch_embeddings(source_dir(root, "bert", "feature-extraction"), [LONG], max_length=16)
    np.testing.assert_allclose(cut, expected, atol=1e-4)
    assert "truncated to 16" in caplog.text


def test_classify_probabilities_are_the_pytorch_softmax(classifier: er.EncoderModel) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    results = classifier.classify(TEXTS, batch_size=2)
    tokenizer = AutoTokenizer.from_pretrained(source(classifier))
    model = AutoModelForSequenceClassification.from_pretrained(source(classifier)).eval()
    with torch.no_grad():
        expected = model(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits.softmax(-1).numpy()
    assert classifier.labels == ("negative", "positive")
    for result, row in zip(results, expected):
        assert isinstance(result, er.Classification)
        assert list(result.scores) == ["negative", "positive"]
        np.testing.assert_allclose(list(result.scores.values()), row, atol=1e-4)
        assert result.label == classifier.labels[int(row.argmax())]
    (alone,) = classifier.classify(TEXTS[0])  # a single str: a list of one
    assert alone.label == results[0].label
    np.testing.assert_allclose(list(alone.scores.values()), list(results[0].scores.values()), atol=1e-5)


def test_multi_label_scores_are_sigmoids(tiny_encoder_bundles: dict[str, Path], classifier: er.EncoderModel) -> None:
    root = tiny_encoder_bundles["sequence-classification"].parent
    multi = er.load_bundle(encoder_bundle(root, "bert", "sequence-classification", multi_label=True,
                                          name="bert-multi"), threads=1)
    single, both = classifier.classify(TEXTS), multi.classify(TEXTS)
    for one, many in zip(single, both):
        p = np.asarray(list(one.scores.values()))
        sigmoid = np.asarray(list(many.scores.values()))
        logits = np.log(sigmoid / (1 - sigmoid))  # softmax over these logits is the single-label answer
        np.testing.assert_allclose(np.exp(logits) / np.exp(logits).sum(), p, atol=1e-4)


def pipeline_entities(model: er.EncoderModel, sentence: str, aggregation: str) -> list[tuple]:
    from transformers import pipeline

    ner = pipeline("token-classification", model=str(source(model)), aggregation_strategy=aggregation)
    key = "entity" if aggregation == "none" else "entity_group"
    return [(e[key], e["start"], e["end"], float(e["score"])) for e in ner(sentence)]


@pytest.mark.parametrize("aggregation", ["none", "simple", "first"])
def test_tag_agrees_with_the_transformers_pipeline(tagger: er.EncoderModel, aggregation: str) -> None:
    tagged = tagger.tag(SENTENCES, aggregation=aggregation)
    assert len(tagged) == len(SENTENCES)
    for sentence, entities in zip(SENTENCES, tagged):
        expected = pipeline_entities(tagger, sentence, aggregation)
        assert expected, "the tiny model tags something in every sentence"
        assert [(e.label, e.start, e.end) for e in entities] == [e[:3] for e in expected]
        np.testing.assert_allclose([e.score for e in entities], [e[3] for e in expected], atol=1e-4)


@pytest.mark.parametrize("aggregation", ["none", "simple", "first"])
def test_entity_offsets_slice_the_original_text(tagger: er.EncoderModel, aggregation: str) -> None:
    for sentence in SENTENCES:
        entities = tagger.tag(sentence, aggregation=aggregation)
        assert entities and all(isinstance(e, er.Entity) for e in entities)
        for entity in entities:
            assert sentence[entity.start:entity.end] == entity.text and entity.text
            assert 0 < entity.score <= 1


def test_first_aggregation_tags_whole_words(tagger: er.EncoderModel) -> None:
    sentence = SENTENCES[2]
    words = {(start, start + len(word)) for start, word in _words(sentence)}
    for entity in tagger.tag(sentence, aggregation="first"):
        assert any(entity.start == s for s, _ in words) and any(entity.end == e for _, e in words)


def _words(text: str) -> list[tuple[int, str]]:
    """(start, word) for each run of letters and for each other non-space character."""
    import re

    return [(m.start(), m.group()) for m in re.finditer(r"\w+|[^\w\s]", text)]


def test_tag_of_an_empty_text_finds_nothing(tagger: er.EncoderModel) -> None:
    assert tagger.tag("") == []
    assert tagger.tag(["", SENTENCES[0]])[0] == []


def test_long_input_is_truncated_with_one_warning(embedder: er.EncoderModel, tagger: er.EncoderModel,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="edgelm_runtime.encoder"):
        vectors = embedder.embed(["short", LONG, LONG])
    assert len(caplog.records) == 1 and "2 of 3 texts are longer than 128 tokens" in caplog.text
    expected = torch_embeddings(source(embedder), ["short", LONG], max_length=128)
    np.testing.assert_allclose(vectors[:2], expected, atol=1e-4)
    entities = tagger.tag(LONG, aggregation="none")
    assert entities and max(e.end for e in entities) < len(LONG) // 2


def test_truncate_false_names_the_text_its_length_and_the_limit(embedder: er.EncoderModel) -> None:
    count = len(embedder.tokenizer.encode(LONG))
    with pytest.raises(er.GenerationError, match=rf"texts\[1\] is {count} tokens; this bundle takes at most 128"):
        embedder.embed(["short", LONG], truncate=False)


@pytest.mark.parametrize(("call", "error", "message"), [
    (lambda m: m.embed([]), er.InputError, "texts is an empty list"),
    (lambda m: m.embed(["fine", 3]), er.InputError, r"texts\[1\] is int, not a string"),
    (lambda m: m.embed(42), er.InputError, "texts must be a string or a list of strings, not int"),
    (lambda m: m.embed(b"bytes"), er.InputError, "not bytes"),
    (lambda m: m.embed("x", batch_size=0), er.InputError, "batch_size is 0"),
    (lambda m: m.embed(["\ud800"]), er.GenerationError, "lone surrogate"),
    (lambda m: m.classify("x"), er.BundleError, "is a feature-extraction bundle; classify.. needs a sequence-classification"),
    (lambda m: m.tag("x"), er.BundleError, r"tag\(\) needs a token-classification bundle"),
    (lambda m: m.generate("x"), er.BundleError, r"generate\(\) needs a text-generation bundle"),
    (lambda m: m.chat([{"role": "user", "content": "hi"}]), er.BundleError, r"chat\(\) needs a text-generation"),
    (lambda m: m.score("x", ["y"]), er.BundleError, r"score\(\) needs a text-generation"),
])
def test_bad_input_is_one_line_with_a_hint(embedder: er.EncoderModel, call, error, message: str) -> None:
    with pytest.raises(error, match=message) as caught:
        call(embedder)
    assert caught.value.hint and "\n" not in str(caught.value)


def test_wrong_task_hint_names_what_the_bundle_serves(classifier: er.EncoderModel, tagger: er.EncoderModel) -> None:
    with pytest.raises(er.BundleError, match=r"serves classify\(\); .*--task feature-extraction"):
        classifier.embed("x")
    with pytest.raises(er.InputError, match="aggregation 'max' is not one of none, simple, first"):
        tagger.tag("x", aggregation="max")


def test_a_decoder_bundle_cannot_embed_or_tag(tiny_bundle: Path) -> None:
    llm = er.load_bundle(tiny_bundle, threads=1)
    with pytest.raises(er.BundleError, match=r"is a text-generation bundle; embed\(\) needs a feature-extraction") as caught:
        llm.embed("hello")
    assert "edgelm build --task feature-extraction" in caught.value.hint
    with pytest.raises(er.BundleError, match=r"tag\(\) needs a token-classification bundle"):
        llm.tag("hello")


@pytest.mark.parametrize(("field", "value", "message"), [
    ("hidden_size", 64, "hidden_size = 64"), ("output", "pooler_output", "no output 'pooler_output'"),
    ("inputs", ["input_ids", "attention_mask"], "'token_type_ids' is not named"),
])
def test_a_manifest_that_does_not_match_the_graph_fails_at_load(tiny_encoder_bundles: dict[str, Path],
                                                                tmp_path: Path, field: str, value, message: str) -> None:
    folder = Path(shutil.copytree(tiny_encoder_bundles["feature-extraction"], tmp_path / "bundle"))
    data = json.loads((folder / MANIFEST_FILE).read_text())
    data["encoder"][field] = value
    (folder / MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(er.BundleError, match=message):
        er.load_bundle(folder, threads=1)


def test_the_tokenizer_file_s_own_truncation_and_padding_are_ignored(tiny_encoder_bundles: dict[str, Path],
                                                                     embedder: er.EncoderModel, tmp_path: Path,
                                                                     edit_manifest) -> None:
    folder = Path(shutil.copytree(tiny_encoder_bundles["feature-extraction"], tmp_path / "bundle"))
    data = json.loads((folder / "tokenizer.json").read_text())
    data["truncation"] = {"direction": "Right", "max_length": 8, "strategy": "LongestFirst", "stride": 0}
    data["padding"] = {"strategy": {"Fixed": 64}, "direction": "Right", "pad_to_multiple_of": None, "pad_id": 0,
                       "pad_type_id": 0, "pad_token": "[PAD]"}
    (folder / "tokenizer.json").write_text(json.dumps(data))
    edit_manifest(folder, lambda manifest: None, relist_files=True)
    np.testing.assert_allclose(er.load_bundle(folder, threads=1).embed(TEXTS), embedder.embed(TEXTS), atol=1e-5)
