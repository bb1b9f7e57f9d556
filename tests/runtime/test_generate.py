"""Generation: same tokens as transformers, reproducible sampling, clean streaming, stop rules."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import edgelm_runtime as er
from edgelm_runtime.generate import MAX_STOP_CHARS, MAX_STOP_STRINGS, StopFilter
from edgelm_runtime.templates import ChatTemplate

PROMPT = "Once upon a time"
GREEDY = er.SamplingParams(temperature=0.0)


@pytest.mark.parametrize("repetition_penalty", [1.0, 10.0])  # 10: the tiny model stops looping
def test_greedy_tokens_equal_transformers(llm: er.LanguageModel, tiny_model_dir: Path,
                                          repetition_penalty: float) -> None:
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    ids = llm.tokenizer.encode(PROMPT)
    eos = list(llm.manifest.eos_token_ids)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, max_new_tokens=16, repetition_penalty=repetition_penalty,
                             eos_token_id=eos, pad_token_id=eos[0])
    expected = out[0, len(ids):].tolist()
    expected = expected[:next((i for i, t in enumerate(expected) if t in eos), len(expected))]
    sampling = er.SamplingParams(temperature=0.0, repetition_penalty=repetition_penalty)
    assert list(llm.generate_tokens(ids, 16, sampling)) == expected


def test_seeded_sampling_is_reproducible_and_seeds_differ(llm: er.LanguageModel) -> None:
    ids = llm.tokenizer.encode(PROMPT)

    def sample(seed: int) -> list[int]:
        return list(llm.generate_tokens(ids, 24, er.SamplingParams(temperature=1.0, seed=seed)))

    assert sample(0) == sample(0)
    assert sample(0) != sample(1)
    assert llm.generate(PROMPT, max_new_tokens=12, temperature=0.9, top_p=0.9, seed=3) == \
        llm.generate(PROMPT, max_new_tokens=12, temperature=0.9, top_p=0.9, seed=3)


@pytest.mark.parametrize("options", [{}, {"temperature": 1.0, "top_k": 40, "seed": 5}])
def test_stream_pieces_join_to_the_generated_text(llm: er.LanguageModel, options: dict) -> None:
    text = llm.generate(PROMPT, max_new_tokens=24, **options)
    tokens = list(llm.generate_tokens(llm.tokenizer.encode(PROMPT), 24, llm.sampling_params(**options)))
    assert "".join(llm.generate_stream(PROMPT, max_new_tokens=24, **options)) == text == llm.tokenizer.decode(tokens)
    messages = [{"role": "user", "content": "Tell me a story"}]
    assert "".join(llm.chat_stream(messages, max_new_tokens=24, **options)) == llm.chat(messages, max_new_tokens=24,
                                                                                           **options)


def test_output_is_cut_before_the_first_stop_string(llm: er.LanguageModel) -> None:
    options = {"max_new_tokens": 32, "temperature": 1.0, "seed": 0}  # sampled: varied text, same every run
    text = llm.generate(PROMPT, **options)
    # two stop strings from the second half whose first occurrence is not at the very start
    stops = [text[k:k + 2] for k in range(len(text) // 2, len(text) - 1) if text.find(text[k:k + 2]) > 0][:2]
    assert stops, f"the tiny model should say something varied: {text!r}"
    cut = min(text.find(s) for s in stops)
    assert llm.generate(PROMPT, stop=stops, **options) == text[:cut]
    pieces = list(llm.generate_stream(PROMPT, stop=stops, **options))
    assert "".join(pieces) == text[:cut]
    assert llm.last_stats is not None and llm.last_stats.finish_reason == "stopped"


def test_streaming_never_yields_part_of_a_stop_string() -> None:
    stops = StopFilter(["<END>"])
    assert [stops.push(p) for p in ["Hello <", "E", "N", "D>!", "ignored"]] == ["Hello ", "", "", "", ""]
    assert stops.stopped and stops.flush() == ""
    stops = StopFilter(["<END>"])
    assert [stops.push(p) for p in ["a <", "EN", "d"]] == ["a ", "", "<ENd"]
    assert stops.push("<E") == "" and stops.flush() == "<E"  # no stop came: the tail is released


def test_empty_stop_string_is_rejected(llm: er.LanguageModel) -> None:
    with pytest.raises(er.GenerationError, match=r"stop\[0\]"):
        llm.generate(PROMPT, stop=[""])


def test_generation_stops_at_eos(llm: er.LanguageModel, bundle_copy: Path, edit_manifest: Callable) -> None:
    ids = llm.tokenizer.encode(PROMPT)
    varied = er.SamplingParams(temperature=0.0, repetition_penalty=10.0)  # greedy, but no loop on one token
    tokens = list(llm.generate_tokens(ids, 8, varied))
    eos = next(t for t in tokens if tokens.index(t) >= 2)  # pretend a later token is eos
    edit_manifest(bundle_copy, lambda m: m.update(eos_token_ids=[eos]))
    model = er.load_bundle(bundle_copy)
    assert list(model.generate_tokens(ids, 8, varied)) == tokens[:tokens.index(eos)]
    assert model.last_stats.finish_reason == "eos"


def test_generation_stops_at_the_context_limit(llm: er.LanguageModel, bundle_copy: Path,
                                               edit_manifest: Callable) -> None:
    edit_manifest(bundle_copy, lambda m: m.update(eos_token_ids=[]))
    model = er.load_bundle(bundle_copy)
    context = model.manifest.max_seq_len
    ids = (llm.tokenizer.encode(PROMPT * context))[:context - 3]
    assert len(list(model.generate_tokens(ids, 10, GREEDY))) == 3
    assert model.last_stats.finish_reason == "max_seq_len"


def test_prompt_filling_the_context_is_refused(llm: er.LanguageModel) -> None:
    context = llm.manifest.max_seq_len
    with pytest.raises(er.GenerationError, match=f"prompt is {context} tokens; the context is {context}") as caught:
        llm.generate_tokens([1] * context, 4, GREEDY)
    assert caught.value.hint
    with pytest.raises(er.GenerationError, match="the context is"):
        llm.generate_stream(PROMPT * context)  # refused when asked, not at the first token
    assert llm.logits([1] * context).shape[0] == context  # scoring may use the whole window


@pytest.mark.parametrize(("option", "value"), [("temperature", -1.0), ("top_p", 0.0), ("top_p", 2.0),
                                               ("top_k", -5), ("repetition_penalty", 0.0)])
def test_invalid_sampling_option_names_the_field(llm: er.LanguageModel, option: str, value: float) -> None:
    with pytest.raises(er.GenerationError, match=option):
        llm.generate_stream(PROMPT, **{option: value})


@pytest.mark.parametrize("max_new_tokens", [0, -1])
def test_max_new_tokens_must_be_positive(llm: er.LanguageModel, max_new_tokens: int) -> None:
    with pytest.raises(er.GenerationError, match="max_new_tokens"):
        llm.generate(PROMPT, max_new_tokens=max_new_tokens)


def test_last_stats_describe_the_generation(llm: er.LanguageModel) -> None:
    ids = llm.tokenizer.encode(PROMPT)
    tokens = list(llm.generate_tokens(ids, 6, GREEDY))
    stats = llm.last_stats
    assert (stats.prompt_tokens, stats.generated_tokens) == (len(ids), len(tokens))
    assert stats.time_to_first_token_s >= stats.prefill_seconds > 0
    if len(tokens) == 6:
        assert stats.finish_reason == "max_new_tokens" and stats.decode_tokens_per_s > 0


def test_chat_history_is_trimmed_oldest_first_keeping_the_system_prompt(llm) -> None:
    system = {"role": "system", "content": "You are terse."}
    turns = []
    for i in range(12):
        turns += [{"role": "user", "content": f"question {i} " + "word " * 12},
                  {"role": "assistant", "content": f"answer {i} " + "word " * 12}]
    turns.append({"role": "user", "content": "last question"})
    kept = llm.fit_history([system, *turns], max_new_tokens=16)
    assert kept[0] == system and kept[-1] == turns[-1] and kept[1]["role"] == "user"
    assert len(kept) < len(turns) + 1 and kept[1:] == turns[len(turns) - len(kept) + 1:]  # a suffix: oldest gone
    prompt = llm.tokenizer.encode(llm.render_chat(kept), add_special_tokens=False)
    assert len(prompt) + 16 <= llm.manifest.max_seq_len
    text = llm.chat([system, *turns], max_new_tokens=4)  # the long conversation still runs
    assert isinstance(text, str)


def test_a_last_message_longer_than_the_context_is_a_clear_error(llm) -> None:
    with pytest.raises(er.GenerationError, match="last message does not fit"):
        llm.fit_history([{"role": "user", "content": "word " * 400}], max_new_tokens=8)
    with pytest.raises(er.GenerationError, match="no user message"):
        llm.fit_history([{"role": "system", "content": "hi"}])


def _one_turn_at_a_time(llm, messages: list[dict], max_new_tokens: int | None) -> list[dict] | None:
    """The trimming rule as first written, one render per dropped turn (quadratic): the reference.
    None where it found nothing that fits."""
    def ids(kept: list[dict]) -> list[int]:
        return llm.tokenizer.encode(llm.render_chat(kept), add_special_tokens=False)

    room = min(max_new_tokens or llm.manifest.generation.max_new_tokens, llm.manifest.max_seq_len // 4)
    budget = llm.manifest.max_seq_len - room
    system = list(messages[:1]) if messages[0]["role"] == "system" else []
    turns = list(messages[len(system):])
    if not turns:
        return None
    prompt = ids(messages)
    while len(prompt) > budget and len(turns) > 1:
        turns = turns[1:]
        while len(turns) > 1 and turns[0]["role"] != "user":
            turns = turns[1:]
        prompt = ids(system + turns)
    return system + turns if len(prompt) <= budget else None


def test_trimming_keeps_what_the_one_turn_at_a_time_rule_kept(llm) -> None:
    rng = random.Random(0)
    for _ in range(150):
        messages = [{"role": rng.choice(["user", "user", "assistant", "tool"]),
                     "content": "word " * rng.choice([0, 1, 3, 10, 40, 150])} for _ in range(rng.randint(1, 60))]
        if rng.random() < 0.5:
            messages.insert(0, {"role": "system", "content": "rules " * rng.randint(0, 30)})
        max_new_tokens = rng.choice([None, 8, 64])
        expected = _one_turn_at_a_time(llm, messages, max_new_tokens)
        try:
            kept = llm.fit_history(messages, max_new_tokens)
        except er.GenerationError:
            kept = None
        assert kept == expected, messages
        if kept is not None:
            assert llm.chat_prompt_ids(messages, max_new_tokens) == \
                llm.tokenizer.encode(llm.render_chat(kept), add_special_tokens=False)


class CountingTemplate:
    def __init__(self, template: ChatTemplate) -> None:
        self.template, self.renders = template, 0

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **variables) -> str:
        self.renders += 1
        return self.template.render(messages, add_generation_prompt, **variables)


@pytest.mark.parametrize("roles", ["alternating", "random"])
def test_trimming_3000_messages_renders_a_logarithmic_number_of_times(llm, roles: str) -> None:
    template = CountingTemplate(ChatTemplate.from_file(llm.path / llm.manifest.chat_template_file,
                                                       llm.manifest.bos_token, llm.manifest.eos_token))
    model = er.LanguageModel(llm.path, llm.manifest, llm.decoder, llm.tokenizer, template)
    rng = random.Random(1)
    turns = [{"role": ("user" if i % 2 == 0 else "assistant") if roles == "alternating" else
              rng.choice(["user", "assistant", "tool"]), "content": f"message {i} " + "x" * rng.randint(0, 30)}
             for i in range(3000)]
    turns[-1]["role"] = "user"
    system = {"role": "system", "content": "Be brief."}
    kept = model.fit_history([system, *turns], max_new_tokens=16)
    candidates = [0, *(i for i in range(1, len(turns) - 1) if turns[i]["role"] == "user"), len(turns) - 1]
    assert template.renders <= 2 * math.log2(len(candidates)) + 3  # one render per candidate: ~1,500
    start = len(turns) - (len(kept) - 1)
    assert kept == [system, *turns[start:]] and start in candidates
    budget = llm.manifest.max_seq_len - 16
    assert len(model.chat_prompt_ids(kept, 16)) <= budget  # it fits, and the next longer candidate does not
    longer = candidates[candidates.index(start) - 1]
    assert len(llm.tokenizer.encode(llm.render_chat([system, *turns[longer:]]), add_special_tokens=False)) > budget


def test_trimming_stops_at_its_deadline(llm) -> None:
    from edgelm_runtime.history import PromptDeadlineError

    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i}"} for i in range(3001)]
    with pytest.raises(PromptDeadlineError, match="deadline"):
        llm.chat_prompt_ids(turns, 16, deadline=time.monotonic() - 1)
    assert llm.chat_prompt_ids(turns, 16, deadline=time.monotonic() + 60)


class _QuadraticStopFilter:
    """StopFilter as first written (every push searches the whole held text): the reference."""

    def __init__(self, stop: list[str]) -> None:
        self._stops, self._held, self.stopped = stop, "", False

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        held = self._held + text
        cut = min((i for i in (held.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped, self._held = True, ""
            return held[:cut]
        keep = max((next((n for n in range(min(len(held), len(s) - 1), 0, -1) if held.endswith(s[:n])), 0)
                    for s in self._stops), default=0)
        self._held = held[len(held) - keep:]
        return held[:len(held) - keep]


def test_stop_filter_matches_the_reference_on_random_streams() -> None:
    rng = random.Random(0)
    for _ in range(2000):
        stops = ["".join(rng.choice("ab<>") for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 4))]
        pieces = ["".join(rng.choice("ab<> ") for _ in range(rng.randint(0, 4))) for _ in range(12)]
        fast, slow = StopFilter(stops), _QuadraticStopFilter(stops)
        assert [fast.push(p) for p in pieces] == [slow.push(p) for p in pieces], (stops, pieces)
        assert fast.stopped == slow.stopped


@pytest.mark.parametrize(("stop", "match"), [(["x"] * (MAX_STOP_STRINGS + 1), "at most 16"),
                                             (["x" * (MAX_STOP_CHARS + 1)], r"stop\[0\] is 257 characters")])
def test_stop_lists_are_bounded(llm: er.LanguageModel, stop: list[str], match: str) -> None:
    with pytest.raises(er.GenerationError, match=match):
        llm.generate(PROMPT, stop=stop)
    StopFilter(stop[:MAX_STOP_STRINGS] if len(stop) > 1 else [stop[0][:MAX_STOP_CHARS]])  # at the limit: fine
