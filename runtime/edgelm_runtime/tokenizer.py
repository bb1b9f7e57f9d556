"""The bundle's tokenizer (a `tokenizers` tokenizer.json) and streaming detokenization.

Token-by-token decoding garbles text: one emoji or CJK character spans several byte-level tokens,
and SentencePiece-style tokenizers drop a leading space at the start of what they decode. The
IncrementalDecoder re-decodes a short window of tokens and only emits complete characters."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from edgelm_runtime.errors import BundleError

REPLACEMENT_CHAR = "\ufffd"  # what a decoder writes for an incomplete UTF-8 sequence


class BundleTokenizer:
    """encode / decode with the bundle's tokenizer.json."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer

    @classmethod
    def from_file(cls, path: str | Path) -> BundleTokenizer:
        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as exc:  # tokenizers raises a bare Exception for unreadable files
            raise BundleError(f"{path}: not a readable tokenizer.json ({exc})",
                              hint="copy the bundle again, or rebuild it") from None

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def incremental_decoder(self, skip_special_tokens: bool = True) -> IncrementalDecoder:
        return IncrementalDecoder(self, skip_special_tokens)


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
