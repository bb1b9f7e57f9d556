"""Continuous batching: concurrent generations share decode steps and each gets what it gets alone."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import edgelm_runtime as er
from edgelm_runtime.errors import GenerationError

GREEDY = er.SamplingParams(temperature=0.0)


@pytest.fixture
def alone(cold: er.LanguageModel) -> er.LanguageModel:
    return cold


@pytest.fixture
def batched(fresh: er.LanguageModel) -> er.LanguageModel:
    fresh.enable_batching(4)
    return fresh


def _prompts(llm: er.LanguageModel, count: int) -> list[list[int]]:
    words = ["cats", "ships", "rivers", "music", "bread", "maps", "stars", "glass"]
    return [llm.tokenizer.encode(f"Story {i} about {words[i % len(words)]}" + " and more" * (i % 3))
            for i in range(count)]


def _together(jobs: list) -> list:
    """Run each job in its own thread, all started at once (a barrier), and return their results."""
    barrier = threading.Barrier(len(jobs))

    def run(job):
        barrier.wait(timeout=30)
        return job()

    with ThreadPoolExecutor(len(jobs)) as pool:
        return [future.result(timeout=120) for future in [pool.submit(run, job) for job in jobs]]


def test_batched_greedy_equals_each_request_alone(batched: er.LanguageModel, alone: er.LanguageModel) -> None:
    prompts = _prompts(batched, 8)  # 8 requests on 4 slots: some join while others are decoding
    expected = [list(alone.generate_tokens(ids, 24 + 3 * i, GREEDY)) for i, ids in enumerate(prompts)]
    stats: list[list] = [[] for _ in prompts]
    got = _together([lambda i=i, ids=ids: list(batched.generate_tokens(ids, 24 + 3 * i, GREEDY, report=stats[i].append))
                     for i, ids in enumerate(prompts)])
    assert got == expected
    assert [s[0].generated_tokens for s in stats] == [len(tokens) for tokens in expected]
    engine = batched._batch
    assert engine.steps < sum(len(tokens) for tokens in expected) * 0.7  # steps were shared


def test_each_request_keeps_its_own_sampling_and_stop_strings(batched: er.LanguageModel,
                                                              alone: er.LanguageModel) -> None:
    prompts = _prompts(batched, 4)
    settings = [(er.SamplingParams(temperature=0.0), None), (er.SamplingParams(temperature=0.9, seed=5), None),
                (er.SamplingParams(temperature=0.0, repetition_penalty=1.3), None),
                (er.SamplingParams(temperature=0.7, top_k=5, seed=2), ["e"])]
    expected = ["".join(alone.stream_ids(ids, 30, params, stop)) for ids, (params, stop) in zip(prompts, settings)]
    got = _together([lambda ids=ids, params=params, stop=stop: "".join(batched.stream_ids(ids, 30, params, stop))
                     for ids, (params, stop) in zip(prompts, settings)])
    assert got == expected


def test_a_cancelled_request_leaves_the_batch_healthy(batched: er.LanguageModel, alone: er.LanguageModel) -> None:
    prompts = _prompts(batched, 4)
    expected = [list(alone.generate_tokens(ids, 40, GREEDY)) for ids in prompts]

    def cancelled() -> list[int]:
        tokens = batched.generate_tokens(prompts[0], 40, GREEDY)
        first = [next(tokens) for _ in range(3)]
        tokens.close()  # the client went away: the row is freed at the next step
        return first

    jobs = [cancelled, *[lambda ids=ids: list(batched.generate_tokens(ids, 40, GREEDY)) for ids in prompts[1:]]]
    got = _together(jobs)
    assert got[0] == expected[0][:3] and got[1:] == expected[1:]
    assert list(batched.generate_tokens(prompts[0], 40, GREEDY)) == expected[0]  # a newcomer after it


def test_a_batched_run_reuses_the_prefix_cache(batched: er.LanguageModel, alone: er.LanguageModel) -> None:
    ids = _prompts(batched, 1)[0]
    first = list(batched.generate_tokens(ids, 16, GREEDY))
    again: list = []
    follow_up = ids + first + batched.tokenizer.encode(" next")
    assert list(batched.generate_tokens(follow_up, 16, GREEDY, report=again.append)) == \
        list(alone.generate_tokens(follow_up, 16, GREEDY))
    assert again[0].cached_tokens >= len(ids) + len(first) - 1  # the output's KV came back from its row


def test_batching_needs_a_shared_kv_buffer(tiny_bundle: Path, edit_manifest, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    edit_manifest(copy, lambda m: m["kv"].update(share_buffer=False))
    llm = er.load_bundle(copy)
    assert llm.kv_cache is None  # no shared buffer: no prefix reuse either
    with pytest.raises(GenerationError, match="cannot be batched"):
        llm.enable_batching(2)


@pytest.mark.parametrize("option, message", [(["--parallel", "0"], "--parallel 0: must be 1 to 64"),
                                             (["--kv-cache-mb", "-1"], "--kv-cache-mb -1.0: must be 0 to 65536")])
def test_serve_refuses_bad_batching_options(tiny_bundle: Path, option: list[str], message: str) -> None:
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "edgelm.cli", "serve", str(tiny_bundle), *option],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and message in result.stderr + result.stdout
    assert "Traceback" not in result.stderr
