"""The bundle's tokenizer (a `tokenizers` tokenizer.json) and streaming detokenization.

Token-by-token decoding garbles text: one emoji or CJK character spans several byte-level tokens,
and SentencePiece-style tokenizers drop a leading space at the start of what they decode. The
IncrementalDecoder re-decodes a short window of tokens and only emits complete characters.

A tokenizer.json is data, but its regexes (Split pre-tokenizers, Replace normalizers and decoders)
run in the Rust library, which panics when a pattern backtracks past Oniguruma's retry limit: a
pyo3 PanicException, a BaseException that `except Exception` lets through. Every call into the
library here turns any failure into one BundleError naming the file, and from_file runs a few
probe texts through the tokenizer first, so a hostile or broken file fails when the bundle loads,
not at a user's request."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from tokenizers import Tokenizer

from edgelm_runtime.errors import BundleError, GenerationError

REPLACEMENT_CHAR = "\ufffd"  # what a decoder writes for an incomplete UTF-8 sequence
# texts a tokenizer must encode and decode at load: prose, digits, whitespace, CJK, emoji, and long
# runs (a letter run ending in punctuation is what sends a backtracking regex past its limit)
PROBE_TEXTS = ("Hello, world! It's 2024: naïve café — 你好，世界 🙂👍🏽\n\tthe end.  ",
               "a" * 200 + "! b " + "1" * 200 + "? " + " " * 100 + "x\n\n" + "é" * 100 + ".")
_T = TypeVar("_T")


class BundleTokenizer:
    """encode / decode with the bundle's tokenizer.json."""

    def __init__(self, tokenizer: Tokenizer, source: str | Path = "tokenizer.json") -> None:
        self._tokenizer = tokenizer
        self._source = str(source)

    @classmethod
    def from_file(cls, path: str | Path) -> BundleTokenizer:
        try:
            tokenizer = cls(guarded(lambda: Tokenizer.from_file(str(path))), path)
        except TokenizerFailure as exc:  # tokenizers raises a bare Exception for unreadable files
            raise BundleError(f"{path}: not a readable tokenizer.json ({exc})",
                              hint="copy the bundle again, or rebuild it") from None
        failure = probe(tokenizer._tokenizer)
        if failure:
            raise BundleError(f"{path}: the tokenizer fails on ordinary text ({failure})",
                              hint="its regexes (pre_tokenizer / normalizer / decoder) are broken or hostile; "
                                   "rebuild the bundle from a model with a working tokenizer.json")
        return tokenizer

    def to_json(self) -> str:
        """The tokenizer.json text, padding and truncation off (for the grammar engine)."""
        def serialize() -> str:
            copy = Tokenizer.from_str(self._tokenizer.to_str())
            copy.no_padding()
            copy.no_truncation()
            return copy.to_str()
        return self._call(serialize)

    @property
    def vocab_size(self) -> int:
        return self._call(lambda: self._tokenizer.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. Through encode_batch, which releases the GIL: encode() holds it for
        the whole call (0.8 s for 1 MB), which would freeze a server's event loop meanwhile."""
        check_text(text)
        return self._call(lambda: self._tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids)

    def encode_batch(self, texts: Sequence[str], max_length: int | None = None) -> list[Encoded]:
        """Each text's tokens with the post-processor's special tokens ([CLS] ... [SEP]), their
        character offsets and word indices, for encoders. `max_length` truncates each to that many
        tokens, special ones included (None: whole texts). The file's own truncation and padding
        settings are switched off: the caller pads, and must see how long each text really is."""
        for index, text in enumerate(texts):
            check_text(text, f"texts[{index}]")

        def work() -> list[Encoded]:
            tokenizer = self._tokenizer
            tokenizer.no_padding()
            try:
                if max_length is None:
                    tokenizer.no_truncation()
                else:
                    tokenizer.enable_truncation(max_length)
                encodings = tokenizer.encode_batch(list(texts), add_special_tokens=True)
            finally:
                tokenizer.no_truncation()
            return [Encoded(tuple(e.ids), tuple(e.offsets), tuple(e.word_ids), tuple(map(bool, e.special_tokens_mask)))
                    for e in encodings]

        return self._call(work)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        ids = list(ids)
        return self._call(lambda: self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens))

    def _call(self, work: Callable[[], _T]) -> _T:
        try:
            return guarded(work)
        except TokenizerFailure as exc:
            raise BundleError(f"{self._source}: the tokenizer failed ({exc})",
                              hint="its regexes are broken or hostile; rebuild the bundle from a model with a "
                                   "working tokenizer.json") from None

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def incremental_decoder(self, skip_special_tokens: bool = True) -> IncrementalDecoder:
        return IncrementalDecoder(self, skip_special_tokens)


@dataclass(frozen=True)
class Encoded:
    """One text's tokens: ids, (start, end) character offsets into the text, the index of the word
    each token belongs to (None for special tokens), and which tokens are special."""

    ids: tuple[int, ...]
    offsets: tuple[tuple[int, int], ...]
    word_ids: tuple[int | None, ...]
    special: tuple[bool, ...]


class TokenizerFailure(Exception):
    """Whatever the tokenizers library raised or panicked with, as one line."""


def guarded(work: Callable[[], _T]) -> _T:
    """`work()`, with any exception or Rust panic from the tokenizers library as TokenizerFailure
    (Ctrl-C and SystemExit pass through)."""
    try:
        return work()
    except BaseException as exc:  # pyo3's PanicException derives from BaseException only
        if not isinstance(exc, Exception) and type(exc).__name__ != "PanicException":
            raise
        lines = str(exc).strip().splitlines()
        raise TokenizerFailure(lines[0][:200] if lines else type(exc).__name__) from None


def probe(tokenizer: Tokenizer) -> str | None:
    """Why `tokenizer` (a tokenizers.Tokenizer) cannot encode and decode PROBE_TEXTS, or None. The
    panic message Rust prints on stderr is kept off the terminal: the caller reports it in one line."""
    try:
        with _quiet_stderr():
            for text in PROBE_TEXTS:
                guarded(lambda text=text: tokenizer.decode(tokenizer.encode(text).ids))
    except TokenizerFailure as exc:
        return str(exc)
    return None


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    try:
        saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    except OSError:  # no stderr to silence
        yield
        return
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class IncrementalDecoder:
    """Turns a stream of token ids into text pieces whose concatenation is decode(all ids).

    The prefix_offset/read_offset scheme of vLLM and transformers' TextStreamer: decode the ids
    from `prefix` (already emitted, kept for context) to the end, and emit what goes beyond the
    decoded prefix once it does not end in an incomplete character (U+FFFD)."""

    def __init__(self, tokenizer: BundleTokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # ids[prefix:read] were emitted last time: decoded again for context
        self._read = 0  # ids before this have been emitted

    def push(self, token_id: int) -> str:
        """Add one token; return the newly completed text ("" while a character is incomplete)."""
        self._ids.append(int(token_id))
        return self._advance(final=False)

    def flush(self) -> str:
        """Whatever is still held back, at the end of the stream (may hold U+FFFD if the
        generation stopped inside a character: decode() of the same ids says the same)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        decode = self._tokenizer.decode
        prefix_text = decode(self._ids[self._prefix:self._read], self._skip)
        text = decode(self._ids[self._prefix:], self._skip)
        if len(text) <= len(prefix_text) or (text.endswith(REPLACEMENT_CHAR) and not final):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(prefix_text):]


def check_text(text: object, what: str = "the text") -> None:
    """Text the tokenizer can take: a str of valid Unicode. Invalid bytes in a terminal line or a
    command-line argument reach Python as lone surrogates (surrogateescape), and a JSON "\\ud800"
    is one too; the Rust tokenizer would fail on them with a TypeError."""
    if not isinstance(text, str):
        raise GenerationError(f"{what} must be a string, not {type(text).__name__}", hint="pass text (str)")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise GenerationError(f"{what} is not valid Unicode: a lone surrogate U+{ord(text[exc.start]):04X} at "
                              f"character {exc.start}", hint="pass UTF-8 text (invalid bytes, e.g. from a Latin-1 "
                              "file, arrive as surrogates)") from None
