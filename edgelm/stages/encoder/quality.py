"""Encoder builds: prove the bundle keeps the fp32 model's outputs, through edgelm-runtime.

Both the packaged bundle and the fp32 export are opened with `edgelm_runtime.load_bundle`, as an
app opens them, and run on held-out sentences (the quality check's eval text, never calibrated
on): embeddings by cosine and by retrieval: does the bundle rank the same document first as fp32
for each query, and how often is it the query's own (the builtin text's 100 article titles as
queries and their articles as documents; for another eval text, each paragraph's first sentence
and the rest of it); classifiers by label agreement (and accuracy on quality.labelled_data); token classifiers
by the F1 of the bundle's entities against fp32's. The profile's `encoder` gates (or the recipe's
quality.*) fail the build with the numbers."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from edgelm.errors import QualityGateError
from edgelm.pipeline.encoder_results import EncoderQualityResult
from edgelm.pipeline.results import PackageResult
from edgelm.pipeline.stage import BuildState, Progress

HELD_OUT_SENTENCES = 256
RETRIEVAL_PAIRS = 256


def held_out_sentences(source: str, count: int = HELD_OUT_SENTENCES) -> list[str]:
    """The first `count` sentences of 20-300 characters of the eval text, in order."""
    from edgelm.eval.text import load_eval_text

    pieces = re.split(r"(?<=[.!?])\s+|\n+", load_eval_text(source))
    return [p.strip() for p in pieces if 20 <= len(p.strip()) <= 300][:count]


def retrieval_pairs(source: str, count: int = RETRIEVAL_PAIRS) -> tuple[list[str], list[str]]:
    """(queries, documents): the builtin articles' titles and bodies; for another text, of its
    first `count` paragraphs with two or more sentences, each one's first sentence and the rest.
    (Sentences as each other's neighbours are no test: most nearest neighbours among unrelated
    sentences are near-ties, and 27 of 27 int8 disagreements measured were within 0.03 cosine.)"""
    from edgelm.eval.text import builtin_articles, load_eval_text

    if source == "builtin":
        pairs = [article.partition("\n") for article in builtin_articles()]
        return [title.strip() for title, _, _ in pairs], [" ".join(body.split()) for _, _, body in pairs]
    queries, documents = [], []
    for paragraph in re.split(r"\n\s*\n", load_eval_text(source)):
        sentences = re.split(r"(?<=[.!?])\s+", " ".join(paragraph.split()))
        if len(sentences) >= 2 and len(sentences[0]) >= 20:
            queries.append(sentences[0])
            documents.append(" ".join(sentences[1:]))
        if len(queries) == count:
            break
    return queries, documents


def held_out_texts(task: str, source: str) -> Any:
    """What the check runs on: (queries, documents) for embeddings, else held-out sentences."""
    return retrieval_pairs(source) if task == "feature-extraction" else held_out_sentences(source)


def _unit(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def embedding_agreement(candidate: tuple[np.ndarray, np.ndarray], reference: tuple[np.ndarray, np.ndarray]) -> dict[str, float]:
    """Cosine of every query and document embedding to fp32's, and retrieval: the same top-1
    document as fp32 (agreement) and the query's own paragraph first (accuracy, both models)."""
    (cq, cd), (rq, rd) = [tuple(_unit(x) for x in pair) for pair in (candidate, reference)]
    cosine = np.concatenate([(cq * rq).sum(axis=1), (cd * rd).sum(axis=1)])
    ours, theirs = (cq @ cd.T).argmax(axis=1), (rq @ rd.T).argmax(axis=1)
    own = np.arange(len(cq))
    return {"mean_cosine": round(float(cosine.mean()), 6), "min_cosine": round(float(cosine.min()), 6),
            "retrieval_agreement": round(float((ours == theirs).mean()), 4),
            "retrieval_accuracy": round(float((ours == own).mean()), 4),
            "reference_retrieval_accuracy": round(float((theirs == own).mean()), 4)}


def entity_f1(candidate: list[list[Any]], reference: list[list[Any]]) -> tuple[float, int]:
    """F1 of the candidate's (text index, start, end, label) entities against the reference's."""
    found = {(i, e.start, e.end, e.label) for i, entities in enumerate(candidate) for e in entities}
    wanted = {(i, e.start, e.end, e.label) for i, entities in enumerate(reference) for e in entities}
    if not found and not wanted:
        return 1.0, 0
    both = len(found & wanted)
    return round(2 * both / (len(found) + len(wanted)), 4), len(wanted)


def compare_encoders(candidate: Any, reference: Any, texts: Any, labelled: list[tuple[str, str]]) -> dict[str, Any]:
    task = reference.task
    metrics: dict[str, Any] = {"task": task, "texts": len(texts)}
    if task == "feature-extraction":
        queries, documents = texts
        metrics["texts"] = len(queries) + len(documents)
        metrics.update(embedding_agreement((candidate.embed(queries), candidate.embed(documents)),
                                           (reference.embed(queries), reference.embed(documents))))
    elif task == "sequence-classification":
        ours, theirs = candidate.classify(texts), reference.classify(texts)
        metrics["label_agreement"] = round(float(np.mean([a.label == b.label for a, b in zip(ours, theirs)])), 4)
        if labelled:
            gold = [label for _, label in labelled]
            for key, model in (("accuracy", candidate), ("reference_accuracy", reference)):
                predicted = model.classify([text for text, _ in labelled])
                metrics[key] = round(float(np.mean([p.label == g for p, g in zip(predicted, gold)])), 4)
            metrics["labelled"] = len(labelled)
    else:
        metrics["entity_f1"], metrics["entities"] = entity_f1(candidate.tag(texts), reference.tag(texts))
    return metrics


_GATES = (("min_mean_cosine", "mean_cosine", "mean cosine"), ("min_retrieval_agreement", "retrieval_agreement",
          "retrieval top-1 agreement"), ("min_label_agreement", "label_agreement", "label agreement"),
          ("min_entity_f1", "entity_f1", "entity F1 vs fp32"))


GATES = tuple(gate for gate, _, _ in _GATES)  # the quality.* fields of encoder builds


def encoder_gate_failures(metrics: dict[str, Any], settings: Any) -> list[str]:
    failures = []
    for gate, key, words in _GATES:
        limit, value = getattr(settings, gate), metrics.get(key)
        if limit is not None and value is not None and value < limit:
            failures.append(f"{words} {value:.4f} < {gate} {limit}")
    return failures


class CheckEncoderQuality:
    name = EncoderQualityResult.stage
    title = "Check quality vs fp32 reference (embeddings, labels, entities)"

    def run(self, state: BuildState, progress: Progress) -> EncoderQualityResult:
        import onnxruntime

        import edgelm_runtime
        from edgelm.stages.encoder.load import read_labelled
        from edgelm.stages.encoder.package import assemble_encoder_bundle
        from edgelm.stages.package import session_options

        settings = state.plan.quality
        texts = held_out_texts(state.encoder.task, settings.eval_text)
        labelled = read_labelled(Path(settings.labelled_data), state.encoder.labels) if settings.labelled_data else []
        reference_dir = state.work_dir / "reference"
        reference_manifest = assemble_encoder_bundle(reference_dir, state.reference_onnx, state,
                                                     f"{state.plan.name}-fp32-reference", "reference",
                                                     "CPUExecutionProvider", session_options(state), static=False)
        provider = state.plan.profile.provider
        measured_on = provider if provider in onnxruntime.get_available_providers() else "CPUExecutionProvider"
        progress(self.name, 0, None, "held-out texts")
        candidate = edgelm_runtime.load_bundle(state.bundle_dir, provider=measured_on,
                                               manifest=state.result(PackageResult).manifest)
        reference = edgelm_runtime.load_bundle(reference_dir, manifest=reference_manifest)
        metrics = compare_encoders(candidate, reference, texts, labelled)
        metrics["provider"] = measured_on
        failures = encoder_gate_failures(metrics, settings)
        if failures:
            raise QualityGateError(self.name, "quality gate failed: " + "; ".join(failures),
                                   hint="no bundle was written; use a higher-precision profile or relax quality.* in the recipe")
        return EncoderQualityResult(**metrics)
