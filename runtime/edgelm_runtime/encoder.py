"""EncoderModel: embeddings, sequence classification and NER from an encoder bundle (BERT family).

The graph is the model's own forward; pooling, softmax and entity grouping happen here in numpy,
so the compiler checks parity on exactly what runs. Texts are sorted by token count within a call,
so each padded batch wastes little, and results come back in the caller's order."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from edgelm_runtime.bundle import MANIFEST_FILE, EncoderLayout, Manifest, resolve_inside
from edgelm_runtime.errors import BundleError, GenerationError, InputError
from edgelm_runtime.prompts import Classification
from edgelm_runtime.session import available_provider, check_names, create_session, session_options, session_providers
from edgelm_runtime.tokenizer import BundleTokenizer, Encoded

logger = logging.getLogger(__name__)

AGGREGATIONS = ("none", "simple", "first")  # transformers' TokenClassificationPipeline strategies of the same names
# what a bundle of each task serves, for the hint of a method called on the wrong kind of bundle
_SERVES = {"text-generation": "generate(), chat(), score() and zero-shot classify()",
           "feature-extraction": "embed()", "sequence-classification": "classify()", "token-classification": "tag()"}


@dataclass(frozen=True)
class Entity:
    """A tagged span: `text` is the original text[start:end] (character offsets), `label` the entity
    type (PER; the full IOB2 tag, B-PER, with aggregation="none"), `score` its probability (a
    group's mean)."""

    text: str
    label: str
    start: int
    end: int
    score: float


def wrong_task(path: Path, task: str, method: str, needs: str) -> BundleError:
    """The one-line error for `method` called on a bundle of `task` when it needs a `needs` bundle."""
    build = "edgelm build (no --task)" if needs == "text-generation" else f"edgelm build --task {needs}"
    return BundleError(f"{path} is a {task} bundle; {method} needs a {needs} bundle",
                       hint=f"this bundle serves {_SERVES[task]}; for {method} build a bundle with {build}")


def open_encoder(folder: Path, manifest: Manifest, tokenizer: BundleTokenizer, threads: int | None = None,
                 provider: str | None = None) -> EncoderModel:
    """The bundle's graph in onnxruntime, on the manifest's provider (or `provider`) and options, as
    open_decoder opens a decoder's."""
    chosen = available_provider(provider or manifest.provider)
    session = create_session(resolve_inside(folder, manifest.model_file, "model_file"),
                             session_options(manifest, threads), session_providers(manifest, chosen))
    return EncoderModel(folder, manifest, session, tokenizer)


class EncoderModel:
    """A loaded encoder bundle: embed(), classify() or tag(), as its task says. Not thread-safe.

    Truncation: a text longer than the bundle takes (encoder.max_length tokens, special tokens
    included; static_seq_len on fixed-shape bundles) is cut to that many tokens, with one warning
    per call, because embedding or tagging a long document's start is what search and NER usually
    want; truncate=False raises a GenerationError naming the text instead, for callers that chunk."""

    def __init__(self, path: Path, manifest: Manifest, session: Any, tokenizer: BundleTokenizer) -> None:
        if manifest.encoder is None:
            raise BundleError(f"{path} is a text-generation bundle, not an encoder bundle",
                              hint="open it with load_bundle()")
        self._path, self._manifest, self._session, self._tokenizer = path, manifest, session, tokenizer
        self._layout: EncoderLayout = manifest.encoder
        self._limit = self._layout.static_seq_len or self._layout.max_length
        self._batch = _check_graph(session, self._layout)  # a fixed batch size, or None

    @property
    def path(self) -> Path:
        return self._path

    @property
    def manifest(self) -> Manifest:
        return self._manifest

    @property
    def task(self) -> str:
        return self._manifest.task

    @property
    def labels(self) -> tuple[str, ...]:
        """The classes of a classification bundle, in the model's id order (() for embeddings)."""
        return self._layout.labels

    @property
    def dim(self) -> int:
        """The hidden size: the width of embed()'s vectors."""
        return self._layout.hidden_size

    @property
    def tokenizer(self) -> BundleTokenizer:
        return self._tokenizer

    def embed(self, texts: str | Sequence[str], *, batch_size: int = 32, truncate: bool = True) -> np.ndarray:
        """float32 (len(texts), dim) vectors (a single str: (1, dim)): the last hidden state pooled
        as the manifest says (mean over the real tokens, the [CLS] token, or max), L2-normalised
        when it says normalize. Padding never changes a text's vector."""
        self._require("feature-extraction", "embed()")
        items = _texts(texts, batch_size)
        encodings = self._encode(items, truncate)
        vectors = np.empty((len(items), self.dim), dtype=np.float32)
        for rows, hidden, mask in self._batches(encodings, batch_size):
            vectors[rows] = _pool(hidden, mask, self._layout.pooling, self._layout.normalize)
        return vectors

    def classify(self, texts: str | Sequence[str], *, batch_size: int = 32, truncate: bool = True) -> list[Classification]:
        """One Classification per text: the most probable label and each label's probability
        (softmax; a sigmoid per label for multi-label bundles, whose scores then need not sum to 1)."""
        self._require("sequence-classification", "classify()")
        items = _texts(texts, batch_size)
        encodings = self._encode(items, truncate)
        results: list[Classification | None] = [None] * len(items)
        labels = self.labels
        for rows, logits, _ in self._batches(encodings, batch_size):
            probabilities = 1 / (1 + np.exp(-logits)) if self._layout.multi_label else _softmax(logits)
            for index, row in zip(rows, probabilities):
                results[index] = Classification(label=labels[int(row.argmax())], scores=dict(zip(labels, map(float, row))))
        return results  # type: ignore[return-value]

    def tag(self, text: str | Sequence[str], *, aggregation: str = "simple", truncate: bool = True,
            batch_size: int = 32) -> list[Entity] | list[list[Entity]]:
        """The entities in `text` (a list of texts: one list per text), as transformers'
        TokenClassificationPipeline finds them with the same `aggregation`: "none" every token not
        tagged O; "simple" adjacent tokens of one entity type grouped (a B- tag starts a new group),
        scores averaged; "first" as simple over words, each word taking its first sub-token's tag.
        Words are the tokenizer's (Encoding.word_ids), so punctuation is a word of its own."""
        self._require("token-classification", "tag()")
        if aggregation not in AGGREGATIONS:
            raise InputError(f"aggregation {aggregation!r} is not one of {', '.join(AGGREGATIONS)}",
                             hint='pass aggregation="simple" (entities), "first" (whole words) or "none" (tokens)')
        items = _texts(text, batch_size)
        encodings = self._encode(items, truncate)
        results: list[list[Entity]] = [[] for _ in items]
        for rows, logits, _ in self._batches(encodings, batch_size):
            for index, row in zip(rows, logits):
                scores = _softmax(row[:len(encodings[index].ids)])
                results[index] = _entities(items[index], encodings[index], scores, self.labels, aggregation)
        return results[0] if isinstance(text, str) else results

    def generate(self, *_: object, **__: object) -> NoReturn:
        raise wrong_task(self._path, self.task, "generate()", "text-generation")

    def generate_stream(self, *_: object, **__: object) -> NoReturn:
        raise wrong_task(self._path, self.task, "generate_stream()", "text-generation")

    def chat(self, *_: object, **__: object) -> NoReturn:
        raise wrong_task(self._path, self.task, "chat()", "text-generation")

    def chat_stream(self, *_: object, **__: object) -> NoReturn:
        raise wrong_task(self._path, self.task, "chat_stream()", "text-generation")

    def score(self, *_: object, **__: object) -> NoReturn:
        raise wrong_task(self._path, self.task, "score()", "text-generation")

    def _require(self, task: str, method: str) -> None:
        if self.task != task:
            raise wrong_task(self._path, self.task, method, task)

    def _encode(self, items: list[str], truncate: bool) -> list[Encoded]:
        """Each text's tokens, cut to the limit (re-encoded by the tokenizer, so the closing [SEP] stays)."""
        encodings = self._tokenizer.encode_batch(items)
        long = [i for i, encoded in enumerate(encodings) if len(encoded.ids) > self._limit]
        if not long:
            return encodings
        first = long[0]
        if not truncate:
            raise GenerationError(f"texts[{first}] is {len(encodings[first].ids)} tokens; this bundle takes at most "
                                  f"{self._limit}", hint=f"shorten or split it, or pass truncate=True to cut it to "
                                                         f"{self._limit} tokens")
        logger.warning("%d of %d texts are longer than %d tokens (texts[%d]: %d); truncated to %d", len(long),
                       len(items), self._limit, first, len(encodings[first].ids), self._limit)
        for index, encoded in zip(long, self._tokenizer.encode_batch([items[i] for i in long], max_length=self._limit)):
            encodings[index] = encoded
        return encodings

    def _batches(self, encodings: list[Encoded], batch_size: int) -> Iterator[tuple[list[int], np.ndarray, np.ndarray]]:
        """(the texts' indices, the graph's float32 output for them, their attention mask), batch by
        batch, texts of similar length together."""
        order = sorted(range(len(encodings)), key=lambda i: len(encodings[i].ids))
        step = self._batch or batch_size
        for first in range(0, len(order), step):
            rows = order[first:first + step]
            ids, mask = self._pad([encodings[i].ids for i in rows], step if self._batch else len(rows))
            yield rows, self._run(ids, mask)[:len(rows)], mask[:len(rows)]

    def _pad(self, sequences: list[tuple[int, ...]], batch: int) -> tuple[np.ndarray, np.ndarray]:
        """Right-padded input_ids and attention mask, as wide as the longest (or static_seq_len); a
        graph of fixed batch size gets copies of the last row to fill it."""
        width = self._layout.static_seq_len or max(len(s) for s in sequences)
        ids = np.full((batch, width), self._layout.pad_token_id, dtype=np.int64)
        mask = np.zeros((batch, width), dtype=np.int64)
        for row in range(batch):
            sequence = sequences[min(row, len(sequences) - 1)]
            ids[row, :len(sequence)] = sequence
            mask[row, :len(sequence)] = 1
        return ids, mask

    def _run(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        output = self._session.run([self._layout.output], {name: feeds[name] for name in self._layout.inputs})[0]
        return output.astype(np.float32, copy=False)


def _check_graph(session: Any, layout: EncoderLayout) -> int | None:
    """The graph's inputs and output are the manifest's, its output as wide as it says; the batch
    size the graph fixes (None: any)."""
    inputs = {i.name: i.shape for i in session.get_inputs()}
    check_names("input", list(layout.inputs), set(inputs), section="encoder.inputs")
    unfed = sorted(set(inputs) - set(layout.inputs))
    if unfed:
        raise BundleError(f"the model input {unfed[0]!r} is not named in {MANIFEST_FILE} encoder.inputs",
                          hint="the manifest does not match model.onnx; rebuild the bundle")
    outputs = {o.name: o.shape for o in session.get_outputs()}
    check_names("output", [layout.output], set(outputs), section="encoder.output")
    shape = outputs[layout.output]
    rank, width, what = (2, len(layout.labels), "len(encoder.labels)") if layout.task == "sequence-classification" \
        else (3, layout.hidden_size if layout.task == "feature-extraction" else len(layout.labels),
              "encoder.hidden_size" if layout.task == "feature-extraction" else "len(encoder.labels)")
    if len(shape) != rank or (isinstance(shape[-1], int) and shape[-1] != width):
        raise BundleError(f"{MANIFEST_FILE}: model.onnx's {layout.output} has shape {shape}; a {layout.task} bundle's "
                          f"is {rank}-D with {what} = {width} last", hint="the manifest does not match model.onnx; "
                                                                          "rebuild the bundle")
    batch, seq = inputs["input_ids"][:2] if len(inputs["input_ids"]) == 2 else (None, None)
    if isinstance(seq, int) and seq != layout.static_seq_len:
        raise BundleError(f"{MANIFEST_FILE}: model.onnx takes sequences of exactly {seq} tokens but "
                          f"encoder.static_seq_len is {layout.static_seq_len}",
                          hint="the manifest does not match model.onnx; rebuild the bundle")
    return batch if isinstance(batch, int) and batch > 0 else None


def _texts(texts: object, batch_size: object) -> list[str]:
    """The caller's texts as a list of str; bad input as one InputError."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise InputError(f"batch_size is {batch_size!r}; it must be a whole number >= 1", hint="pass batch_size=32, say")
    if isinstance(texts, str):
        items = [texts]
    elif isinstance(texts, (bytes, bytearray)) or not isinstance(texts, Sequence):
        raise InputError(f"texts must be a string or a list of strings, not {type(texts).__name__}",
                         hint='pass "some text" or ["one text", "another"]')
    else:
        items = list(texts)
    if not items:
        raise InputError("texts is an empty list", hint="pass at least one string (an empty string is fine)")
    for index, item in enumerate(items):
        if not isinstance(item, str):
            raise InputError(f"texts[{index}] is {type(item).__name__}, not a string", hint="pass a list of str")
    return items


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def _pool(hidden: np.ndarray, mask: np.ndarray, pooling: str | None, normalize: bool) -> np.ndarray:
    """(batch, dim) from (batch, seq, dim) as sentence-transformers' Pooling and Normalize do."""
    real = mask[:, :, None].astype(np.float32)
    if pooling == "cls":
        pooled = hidden[:, 0]
    elif pooling == "max":
        pooled = np.where(real > 0, hidden, np.float32(-1e9)).max(axis=1)
    else:
        pooled = (hidden * real).sum(axis=1) / np.maximum(real.sum(axis=1), 1e-9)
    if normalize:
        pooled = pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
    return pooled.astype(np.float32, copy=False)


def _entities(text: str, encoded: Encoded, scores: np.ndarray, labels: tuple[str, ...], aggregation: str) -> list[Entity]:
    """transformers' TokenClassificationPipeline postprocess (gather_pre_entities, aggregate,
    group_entities) on one text: special tokens dropped, then tokens or words grouped."""
    tokens = [i for i, special in enumerate(encoded.special) if not special]
    if aggregation == "first":  # a word: tokens sharing a word index; its tag is its first token's
        words: list[list[int]] = []
        for i in tokens:
            word = encoded.word_ids[i]
            if words and word is not None and word == encoded.word_ids[words[-1][-1]]:
                words[-1].append(i)
            else:
                words.append([i])
        spans = [(w[0], encoded.offsets[w[0]][0], encoded.offsets[w[-1]][1]) for w in words]
    else:
        spans = [(i, *encoded.offsets[i]) for i in tokens]
    pieces = [(labels[best := int(scores[i].argmax())], float(scores[i, best]), start, end) for i, start, end in spans]
    if aggregation == "none":
        return [Entity(text[start:end], label, start, end, score) for label, score, start, end in pieces if label != "O"]
    groups: list[list[tuple[str, float, int, int]]] = []
    for piece in pieces:  # group_entities: same type and not a B- tag joins the group before
        bi, kind = _split_tag(piece[0])
        if groups and bi != "B" and kind == _split_tag(groups[-1][-1][0])[1]:
            groups[-1].append(piece)
        else:
            groups.append([piece])
    entities = []
    for group in groups:
        label, start, end = group[0][0].split("-", 1)[-1], group[0][2], group[-1][3]
        if label != "O":
            entities.append(Entity(text[start:end], label, start, end, float(np.mean([p[1] for p in group]))))
    return entities


def _split_tag(label: str) -> tuple[str, str]:
    """("B" | "I", entity type); a label without a B-/I- prefix continues ("I")."""
    return (label[0], label[2:]) if label.startswith(("B-", "I-")) else ("I", label)
