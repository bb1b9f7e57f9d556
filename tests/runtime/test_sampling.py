"""Sampling parameters are checked with the field's name; the sampler follows the usual semantics."""

from __future__ import annotations

import numpy as np
import pytest

from edgelm_runtime import GenerationError, SamplingParams
from edgelm_runtime.sampling import Sampler

LOGITS = np.array([1.0, 3.0, 2.9, -1.0, 0.5], dtype=np.float32)


@pytest.mark.parametrize(("field", "value"), [
    ("temperature", -0.1), ("temperature", float("nan")), ("top_p", 0.0), ("top_p", 1.5),
    ("top_k", -1), ("top_k", 2.5), ("repetition_penalty", 0.0), ("seed", -3),
])
def test_invalid_params_name_the_field_and_range(field: str, value: float) -> None:
    with pytest.raises(GenerationError, match=f"^{field} is") as caught:
        SamplingParams(**{field: value})
    assert caught.value.hint


def test_temperature_zero_is_argmax() -> None:
    assert Sampler(SamplingParams(temperature=0.0)).sample(LOGITS) == 1


def test_top_k_one_and_tiny_top_p_are_greedy() -> None:
    for params in (SamplingParams(temperature=1.5, top_k=1, seed=0),
                   SamplingParams(temperature=1.5, top_p=1e-6, seed=0)):
        sampler = Sampler(params)
        assert {sampler.sample(LOGITS) for _ in range(50)} == {1}


def test_top_k_two_only_picks_the_two_best() -> None:
    sampler = Sampler(SamplingParams(temperature=5.0, top_k=2, seed=0))
    assert {sampler.sample(LOGITS) for _ in range(200)} == {1, 2}


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    sampler = Sampler(SamplingParams(temperature=1.0, top_p=0.7, seed=0))
    assert {sampler.sample(np.log(probs)) for _ in range(300)} == {0, 1}


def test_repetition_penalty_demotes_seen_tokens() -> None:
    greedy = Sampler(SamplingParams(temperature=0.0, repetition_penalty=1.3))
    assert greedy.sample(LOGITS, seen=np.array([1])) == 2  # 3.0 / 1.3 < 2.9
    seen = np.zeros(LOGITS.size, dtype=bool)
    seen[[1, 2]] = True
    assert Sampler(SamplingParams(repetition_penalty=4.0)).sample(LOGITS, seen=seen) == 0  # 0.75, 0.725 < 1.0
    negative = np.array([-1.0, -1.1], dtype=np.float32)
    assert Sampler(SamplingParams(repetition_penalty=1.2)).sample(negative, seen=np.array([0])) == 1  # -1.2 < -1.1


def test_same_seed_same_choices_and_logits_untouched() -> None:
    logits = LOGITS.copy()
    first, second = (Sampler(SamplingParams(temperature=2.0, seed=7)) for _ in range(2))
    assert [first.sample(logits) for _ in range(30)] == [second.sample(logits) for _ in range(30)]
    np.testing.assert_array_equal(logits, LOGITS)
