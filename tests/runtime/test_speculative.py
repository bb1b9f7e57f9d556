"""Prompt-lookup speculative decoding gives plain greedy decoding's tokens, only in fewer runs."""

from __future__ import annotations

import random

import pytest

import edgelm_runtime as er
from edgelm_runtime.errors import GenerationError
from edgelm_runtime.lookup import PromptLookup

PLAIN = er.SamplingParams(temperature=0.0)
LOOKUP = er.SamplingParams(temperature=0.0, prompt_lookup=6)


def _prompts(llm: er.LanguageModel, count: int) -> list[list[int]]:
    """Token prompts that repeat themselves (what lookup drafts from) and that do not."""
    rng = random.Random(7)
    vocab = llm.manifest.vocab_size
    prompts = []
    for index in range(count):
        piece = [rng.randrange(3, vocab) for _ in range(rng.randrange(3, 9))]
        prompts.append(piece * rng.randrange(2, 5) if index % 2 == 0 else piece + piece[::-1])
    return prompts


def test_speculative_greedy_equals_plain_greedy(llm: er.LanguageModel) -> None:
    drafted = accepted = 0
    for ids in _prompts(llm, 24):
        plain = list(llm.generate_tokens(ids, 40, PLAIN))
        fast = list(llm.generate_tokens(ids, 40, LOOKUP))
        assert fast == plain, ids
        stats = llm.last_stats
        assert stats.generated_tokens == len(plain)
        drafted, accepted = drafted + stats.draft_tokens, accepted + stats.accepted_tokens
    assert accepted > 0 and drafted > accepted  # drafts were verified, some kept and some rewound


@pytest.mark.parametrize("max_new_tokens", [1, 2, 3, 5, 8, 13])
def test_speculation_stops_at_max_new_tokens(llm: er.LanguageModel, max_new_tokens: int) -> None:
    for ids in _prompts(llm, 6):
        plain = list(llm.generate_tokens(ids, max_new_tokens, PLAIN))
        plain_reason = llm.last_stats.finish_reason
        fast = list(llm.generate_tokens(ids, max_new_tokens, LOOKUP))
        assert fast == plain and llm.last_stats.finish_reason == plain_reason
        assert len(fast) <= max_new_tokens


def test_speculation_stops_at_the_end_of_the_context(llm: er.LanguageModel) -> None:
    room = 7
    ids = (_prompts(llm, 1)[0] * 400)[:llm.manifest.max_seq_len - room]
    plain = list(llm.generate_tokens(ids, 64, PLAIN))
    assert llm.last_stats.finish_reason in ("max_seq_len", "eos")
    assert list(llm.generate_tokens(ids, 64, LOOKUP)) == plain
    assert len(ids) + len(plain) <= llm.manifest.max_seq_len


def test_speculation_keeps_stop_strings(llm: er.LanguageModel) -> None:
    checked = 0
    for ids in _prompts(llm, 12):
        text = "".join(llm.stream_ids(ids, 40, PLAIN))
        stop = text[len(text) // 2:len(text) // 2 + 2]
        if len(stop) < 2 or "\ufffd" in stop:
            continue
        plain = "".join(llm.stream_ids(ids, 40, PLAIN, [stop]))
        fast = "".join(llm.stream_ids(ids, 40, LOOKUP, [stop]))
        assert fast == plain == text[:text.index(stop)]
        assert llm.last_stats.finish_reason == "stopped"
        checked += 1
    assert checked >= 3


def test_sampling_ignores_prompt_lookup(llm: er.LanguageModel) -> None:
    ids = _prompts(llm, 1)[0]
    sampled = er.SamplingParams(temperature=0.8, seed=3)
    with_lookup = er.SamplingParams(temperature=0.8, seed=3, prompt_lookup=6)
    assert list(llm.generate_tokens(ids, 24, with_lookup)) == list(llm.generate_tokens(ids, 24, sampled))
    assert llm.last_stats.draft_tokens == 0


@pytest.mark.parametrize("value", [-1, 65, 2.5, True])
def test_prompt_lookup_out_of_range_is_refused(value: object) -> None:
    with pytest.raises(GenerationError, match="prompt_lookup"):
        er.SamplingParams(prompt_lookup=value)


def test_lookup_drafts_what_followed_the_last_ngram() -> None:
    lookup = PromptLookup([5, 6, 7, 8, 9, 1, 2, 5, 6], max_draft=3)
    assert lookup.draft(8) == [7, 8, 9]
    assert lookup.draft(2) == [7, 8]
    lookup.accepted(3, 0)  # a wrong draft shrinks the next one
    assert lookup.draft(8) == [7]
    assert PromptLookup([1, 2, 3, 4], max_draft=4).draft(4) == []  # nothing repeats


def test_on_by_default_only_where_the_profile_says_it_is_exact(llm: er.LanguageModel, tiny_int8_report) -> None:
    assert llm.manifest.profile == "cpu-fp32" and llm.sampling_params().prompt_lookup == 8
    int8 = er.load_bundle(tiny_int8_report.output)
    assert int8.sampling_params().prompt_lookup == 0  # activations quantized at run time: off
    ids = _prompts(llm, 1)[0]
    assert list(llm.generate_tokens(ids, 24)) == list(llm.generate_tokens(ids, 24, PLAIN))
