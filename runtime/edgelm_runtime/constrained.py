"""Constrained decoding: the output follows a JSON schema, a regex, a list of choices or a grammar.

The grammar engine is llguidance (the one onnxruntime-genai uses; an abi3 wheel with no
dependencies), not a hand-written one. Each step, the engine's token mask sets every token the
grammar cannot take next to -inf in the logits, before any sampling filter; the sampled token then
advances the engine. llguidance was chosen over outlines-core by measurement (docs/serving.md):
it needs no index built per schema up front (outlines-core compiles a regex DFA over the whole
vocabulary first), handles JSON schema, regex and Lark grammars in one engine, and computes a mask
in microseconds.

A schema or grammar that does not compile is a GenerationError before any token is generated:
this never fails open into unconstrained text."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from time import perf_counter
from typing import Any

import numpy as np

from edgelm_runtime.errors import GenerationError

MAX_GRAMMAR_CHARS = 200_000  # a schema or grammar this long is an attack, not a request
MAX_CHOICES = 1024
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def grammar_spec(json_schema: Any = None, regex: str | None = None, choices: Sequence[str] | None = None,
                 grammar: str | None = None) -> tuple[str, str] | None:
    """(llguidance's grammar, the argument's name) for the one constraint given (None when none
    is). `json_schema` is a dict (or its JSON text), `regex` a Rust-syntax regex over the whole
    output, `choices` the exact strings allowed, `grammar` a Lark grammar (llguidance's dialect:
    `%json {...}` embeds a schema)."""
    from llguidance import LLMatcher

    given = [name for name, value in (("json_schema", json_schema), ("regex", regex), ("choices", choices),
                                      ("grammar", grammar)) if value is not None]
    if not given:
        return None
    if len(given) > 1:
        raise GenerationError(f"{' and '.join(given)} were both given; a generation takes one constraint",
                              hint="pass only one of json_schema, regex, choices, grammar")
    if json_schema is not None:
        # one line, ", " and ": " between items: a small model given free whitespace wanders in it
        # (a schema's own "x-guidance" options win)
        return _bounded(LLMatcher.grammar_from_json_schema(_schema(json_schema), defaults=JSON_LAYOUT), "json_schema")
    if regex is not None:
        if not isinstance(regex, str) or not regex:
            raise GenerationError(f"regex is {_show(regex)}; it must be a non-empty string", hint='pass e.g. regex=r"\\d+"')
        return _bounded(LLMatcher.grammar_from_regex(regex), "regex")
    if choices is not None:
        return _bounded(LLMatcher.grammar_from_lark(_choices_lark(choices)), "choices")
    if not isinstance(grammar, str) or not grammar.strip():
        raise GenerationError(f"grammar is {_show(grammar)}; it must be a Lark grammar", hint='pass e.g. grammar=\'start: "yes" | "no"\'')
    return _bounded(LLMatcher.grammar_from_lark(grammar), "grammar")


def _schema(value: Any) -> dict[str, Any] | bool:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise GenerationError("json_schema is not valid JSON", hint="pass the schema as a dict or its JSON text") from None
    if not isinstance(value, (dict, bool)):
        raise GenerationError(f"json_schema is a {type(value).__name__}; it must be a JSON schema object",
                              hint='pass e.g. {"type": "object", "properties": {...}}')
    return value


def _choices_lark(choices: Sequence[str]) -> str:
    if isinstance(choices, str) or not isinstance(choices, Sequence) or not choices:
        raise GenerationError("choices must be a non-empty list of strings", hint='pass e.g. choices=["yes", "no"]')
    if len(choices) > MAX_CHOICES:
        raise GenerationError(f"choices has {len(choices)} entries; at most {MAX_CHOICES} are allowed", hint="pass fewer")
    for index, choice in enumerate(choices):
        if not isinstance(choice, str) or not choice:
            raise GenerationError(f"choices[{index}] is {_show(choice)}; each choice must be a non-empty string",
                                  hint='pass e.g. choices=["yes", "no"]')
    return "start: " + " | ".join(json.dumps(choice) for choice in choices)  # Lark strings take JSON escapes


def _bounded(spec: str, what: str) -> tuple[str, str]:
    if len(spec) > MAX_GRAMMAR_CHARS:
        raise GenerationError(f"{what} is {len(spec)} characters as a grammar; at most {MAX_GRAMMAR_CHARS} are allowed",
                              hint=f"pass a smaller {what}")
    return spec, what


class GrammarTokenizer:
    """The bundle's tokenizer as the grammar engine sees it (built once per model: ~0.2 s)."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        from llguidance import LLTokenizer

        self.vocab_size = vocab_size
        try:  # no eos ids: the engine picks the tokenizer's own
            self._tokenizer = LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=list(eos_token_ids) or None)
        except (ValueError, RuntimeError) as exc:
            raise GenerationError(f"the bundle's tokenizer cannot drive the grammar engine ({_first_line(str(exc))})",
                                  hint="constrained decoding needs a tokenizer.json the tokenizers library reads") from None

    def constraint(self, spec: str, what: str = "grammar") -> TokenConstraint:
        """A fresh matcher for `spec` (from grammar_spec); GenerationError if it does not compile."""
        from llguidance import LLMatcher

        matcher = LLMatcher(self._tokenizer, spec)
        if matcher.is_error():
            raise GenerationError(f"the {what} does not compile: {_first_line(matcher.get_error())}",
                                  hint=f"fix the {what}; nothing was generated")
        return TokenConstraint(matcher, self.vocab_size, what)


@dataclass
class ConstraintStats:
    masked_steps: int = 0
    mask_seconds: float = 0.0  # computing and applying the masks, and advancing the matcher


class TokenConstraint:
    """One generation's matcher: `apply(logits)` masks what the grammar forbids, `advance(token)`
    moves it on; `finished` once the grammar can take nothing more."""

    def __init__(self, matcher: Any, vocab_size: int, what: str) -> None:
        self._matcher, self._what = matcher, what
        self._words = np.zeros((vocab_size + 31) // 32, dtype=np.int32)
        self.stats = ConstraintStats()
        self._check()

    @property
    def finished(self) -> bool:
        return bool(self._matcher.is_stopped())

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """A copy of the (V,) logits with every token the grammar forbids at -inf."""
        start = perf_counter()
        self._matcher.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
        self._check()
        allowed = np.unpackbits(self._words.view(np.uint8), bitorder="little", count=logits.shape[-1]).view(bool)
        masked = np.where(allowed, logits, np.float32(-np.inf))
        self.stats.masked_steps += 1
        self.stats.mask_seconds += perf_counter() - start
        return masked

    def advance(self, token: int) -> None:
        start = perf_counter()
        self._matcher.consume_token(int(token))
        self._check()
        self.stats.mask_seconds += perf_counter() - start

    def _check(self) -> None:
        if self._matcher.is_error():
            raise GenerationError(f"the {self._what} failed while generating: {_first_line(self._matcher.get_error())}",
                                  hint=f"simplify the {self._what}")


def _first_line(text: str) -> str:
    line = next((part.strip() for part in str(text).splitlines() if part.strip()), "unknown error")
    return line if len(line) <= 200 else line[:197] + "..."


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
