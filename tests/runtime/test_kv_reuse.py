"""Prefix KV reuse: a prompt that starts like an earlier run feeds only its new tokens, and gets the
tokens a cold prefill gets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import edgelm_runtime as er
from edgelm_runtime.kv_reuse import PrefixCache

GREEDY = er.SamplingParams(temperature=0.0)


@pytest.fixture
def warm(fresh: er.LanguageModel) -> er.LanguageModel:
    return fresh


def _turns(llm: er.LanguageModel, count: int, trim_after: int | None = None) -> list[tuple[str, int]]:
    """A greedy chat of `count` turns: each reply and how many prompt tokens came from the cache."""
    messages: list[dict[str, str]] = [{"role": "system", "content": "You are terse."}]
    replies = []
    for turn in range(count):
        messages.append({"role": "user", "content": f"Question {turn}: what comes after {turn * 7}?"})
        if trim_after is not None and turn == trim_after:
            messages = [messages[0], *messages[3:]]  # the oldest exchange dropped, as fit_history does
        reply = llm.chat(messages, max_new_tokens=10, temperature=0.0)
        replies.append((reply, llm.last_stats.cached_tokens))
        messages.append({"role": "assistant", "content": reply})
    return replies


def test_chat_turns_reuse_the_history_and_answer_as_a_cold_prefill(warm: er.LanguageModel,
                                                                   cold: er.LanguageModel) -> None:
    assert cold.kv_cache is None and warm.kv_cache is not None
    warm_turns, cold_turns = _turns(warm, 6), _turns(cold, 6)
    assert [reply for reply, _ in warm_turns] == [reply for reply, _ in cold_turns]
    assert all(cached == 0 for _, cached in cold_turns) and warm_turns[0][1] == 0
    cached = [tokens for _, tokens in warm_turns]
    assert all(tokens > 0 for tokens in cached[1:])
    # each turn reuses the whole previous prompt (the tiny context then trims the 6th turn's history)
    assert cached[1] >= len(warm.chat_prompt_ids([{"role": "system", "content": "You are terse."},
                                                  {"role": "user", "content": "Question 0: what comes after 0?"}]))
    assert cached[1] < cached[2] < cached[3] < cached[4]


def test_a_trimmed_history_reuses_only_what_is_unchanged(warm: er.LanguageModel, cold: er.LanguageModel) -> None:
    warm_turns, cold_turns = _turns(warm, 4, trim_after=3), _turns(cold, 4, trim_after=3)
    assert [reply for reply, _ in warm_turns] == [reply for reply, _ in cold_turns]
    assert warm_turns[3][1] < warm_turns[2][1]  # only the system turn is still a shared prefix


def test_same_prompt_twice_still_runs_its_last_token(warm: er.LanguageModel) -> None:
    ids = warm.tokenizer.encode("Once upon a time")
    first = list(warm.generate_tokens(ids, 8, GREEDY))
    again = list(warm.generate_tokens(ids, 8, GREEDY))
    assert again == first and warm.last_stats.cached_tokens == len(ids) - 1


def test_few_shot_classify_reuses_the_shared_prompt(warm: er.LanguageModel, cold: er.LanguageModel,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    examples = [("a wonderful film", "positive"), ("a dreadful bore", "negative")] * 3
    taken: list[int] = []
    take = warm.kv_cache.take
    monkeypatch.setattr(warm.kv_cache, "take", lambda *a, **k: _record(take(*a, **k), taken))
    texts = ["a fine film", "a poor plot", "great acting"]
    for text in texts:
        got = warm.classify(text, labels=["positive", "negative"], examples=examples)
        want = cold.classify(text, labels=["positive", "negative"], examples=examples)
        assert got.label == want.label and got.scores == pytest.approx(want.scores, abs=1e-5)
    assert taken[0] == 0 and min(taken[1:]) > 20  # the instruction and examples ran once


def _record(stepper, taken: list[int]):
    taken.append(stepper.length)
    return stepper


def test_the_cache_stays_within_its_budget(tiny_bundle: Path) -> None:
    llm = er.load_bundle(tiny_bundle, kv_cache_mb=0.5)
    for seed in range(12):
        ids = [int(t) for t in np.random.default_rng(seed).integers(3, llm.manifest.vocab_size, 40)]
        list(llm.generate_tokens(ids, 4, GREEDY))
        assert llm.kv_cache.cached_bytes <= llm.kv_cache.budget_bytes
    assert llm.kv_cache.cached_bytes > 0


def test_runs_with_other_bound_inputs_never_match(llm: er.LanguageModel) -> None:
    cache = PrefixCache(llm.decoder, 2**24, llm.manifest.max_seq_len)
    ids = llm.tokenizer.encode("Once upon a time there was")
    stepper = cache.take(ids, 64)
    stepper.feed(np.asarray(ids))
    cache.put(stepper)
    assert cache.take(ids, 64, {}).length == 0  # another adapter's tensors: its cache would be wrong
    assert cache.take(ids, 64).length == len(ids) - 1


def test_a_longer_prompt_moves_the_cache_into_more_room(llm: er.LanguageModel) -> None:
    cache = PrefixCache(llm.decoder, 2**26, llm.manifest.max_seq_len)
    ids = [int(t) for t in np.random.default_rng(0).integers(3, llm.manifest.vocab_size, 30)]
    stepper = cache.take(ids, 31)
    expected = stepper.feed(np.asarray(ids)).copy()
    cache.put(stepper)
    longer = ids + ids
    grown = cache.take(longer, len(longer) + 300)
    assert grown.length == len(ids) and grown.capacity >= len(longer) + 300
    fresh = llm.decoder.stepper(len(longer) + 1)
    np.testing.assert_allclose(grown.feed(np.asarray(longer[len(ids):])),
                               (fresh.feed(np.asarray(longer)), expected)[0], atol=1e-4)
