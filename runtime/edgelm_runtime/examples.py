"""Few-shot examples chosen per query: the nearest by embedding similarity (KATE, Liu et al. 2022:
"What Makes Good In-Context Examples for GPT-3?"), embedded by an encoder bundle.

    picker = NearestExamples(er.load_bundle("dist/minilm-int8"), [(text, label), ...])
    llm.classify(review, labels=["positive", "negative"], examples=picker.select(review, 3))

The pool is embedded once. `select` returns the k most similar examples, the most similar
last: it then sits next to the query in the prompt, as KATE orders them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edgelm_runtime.errors import InputError


class NearestExamples:
    """A pool of (text, label) examples and the encoder bundle that embeds them."""

    def __init__(self, embedder: object, examples: Sequence[tuple[str, str]]) -> None:
        if not hasattr(embedder, "embed"):
            raise InputError(f"embedder: {type(embedder).__name__} has no embed(); pass a feature-extraction bundle",
                             hint="er.load_bundle('dist/minilm-int8'), built with edgelm build --task feature-extraction")
        if not examples:
            raise InputError("examples: the pool is empty", hint="pass at least one (text, label) pair")
        self._embedder, self._examples = embedder, [(str(text), str(label)) for text, label in examples]
        self._vectors = _unit(embedder.embed([text for text, _ in self._examples]))

    def __len__(self) -> int:
        return len(self._examples)

    def select(self, text: str, k: int) -> list[tuple[str, str]]:
        """The k pool examples most similar to `text` (cosine), least similar first."""
        if k < 0:
            raise InputError(f"k: {k} is negative", hint="ask for 0 or more examples")
        if k == 0:
            return []
        similarity = self._vectors @ _unit(self._embedder.embed([text]))[0]
        order = np.argsort(-similarity, kind="stable")[: min(k, len(self._examples))]
        return [self._examples[i] for i in order[::-1]]


def _unit(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
