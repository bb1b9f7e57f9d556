"""Streaming detokenization never shows half a character and adds up to the full decode."""

from __future__ import annotations

import pytest

import edgelm_runtime as er
from edgelm_runtime.tokenizer import REPLACEMENT_CHAR, BundleTokenizer

TEXTS = ["héllo wörld", "你好，世界", "launch 🚀 now 😀👍🏽", "naïve café — ok",
         "混合 text 🙂 and 中文"]


def _stream(tokenizer: BundleTokenizer, ids: list[int]) -> list[str]:
    decoder = tokenizer.incremental_decoder()
    pieces = [decoder.push(token) for token in ids]
    return pieces + [decoder.flush()]


@pytest.mark.parametrize("text", TEXTS)
def test_byte_tokens_stream_whole_characters(byte_tokenizer: BundleTokenizer, text: str) -> None:
    ids = byte_tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == len(text.encode("utf-8"))  # really one token per byte
    pieces = _stream(byte_tokenizer, ids)
    assert not any(REPLACEMENT_CHAR in piece for piece in pieces)
    assert "".join(pieces) == byte_tokenizer.decode(ids) == text


def test_each_character_appears_as_soon_as_it_is_complete(byte_tokenizer: BundleTokenizer) -> None:
    decoder = byte_tokenizer.incremental_decoder()
    pieces = [decoder.push(token) for token in byte_tokenizer.encode("a😀", add_special_tokens=False)]
    assert pieces == ["a", "", "", "", "😀"]


@pytest.mark.parametrize("text", TEXTS)
def test_bundle_tokenizer_streams_cleanly(llm: er.LanguageModel, text: str) -> None:
    ids = llm.tokenizer.encode(text, add_special_tokens=False)
    pieces = _stream(llm.tokenizer, ids)
    assert not any(REPLACEMENT_CHAR in piece for piece in pieces)
    assert "".join(pieces) == llm.tokenizer.decode(ids)


def test_flush_returns_an_unfinished_character_like_decode(byte_tokenizer: BundleTokenizer) -> None:
    ids = byte_tokenizer.encode("ok😀", add_special_tokens=False)[:-1]  # stopped inside the emoji
    pieces = _stream(byte_tokenizer, ids)
    assert pieces[:-1] == ["o", "k", "", "", ""]
    assert REPLACEMENT_CHAR in pieces[-1]
    assert "".join(pieces) == byte_tokenizer.decode(ids)
