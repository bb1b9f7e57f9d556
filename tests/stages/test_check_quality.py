"""The quality check alone: the packaged bundle against the fp32 export, both through edgelm_runtime,
on fixed held-out windows; numbers a user can reproduce, and its limits refused by name."""

from __future__ import annotations

import pytest

from edgelm import api
from edgelm.errors import ConfigError
from edgelm.pipeline.stage import no_progress
from edgelm.stages.check.quality import CheckQuality
from tests.conftest import run_until


@pytest.fixture(scope="module")
def packaged(tiny_model_dir, tiny_recipe, tmp_path_factory):
    plan = api.plan_build(profile="cpu-int8", recipe=tiny_recipe, model=str(tiny_model_dir), name="quality")
    return run_until(plan, tmp_path_factory.mktemp("quality"), "package")


def test_the_check_measures_the_bundle_against_fp32_and_repeats_exactly(packaged):
    first = CheckQuality().run(packaged, no_progress)
    second = CheckQuality().run(packaged, no_progress)
    assert first.record() == second.record()  # same windows (sha256), same numbers
    assert first.windows == packaged.plan.quality.windows and first.tokens == first.windows * (first.window_len - 1)
    assert first.perplexity_ratio == pytest.approx(first.perplexity / first.reference_perplexity)
    assert 1.0 <= first.perplexity_ratio < 1.05 and first.top1_agreement >= 0.8  # 8-bit weights: close to fp32
    assert first.kl_divergence > 0 and first.measured_on == first.provider == "CPUExecutionProvider"
    chat = first.chat  # the tiny recipe's 6 chat prompts x 8 tokens, greedy, repeated exactly above
    assert chat["prompts"] == 6 and chat["tokens"] == 8 and 0 <= chat["identical"] <= 1
    assert first.note() == (f"ppl {first.perplexity:.2f} vs {first.reference_perplexity:.2f} "
                            f"(x{first.perplexity_ratio:.3f}), top-1 {first.top1_agreement:.3f}, "
                            f"chat: {chat['identical']:.0%} of 6 answers identical, prefix {chat['mean_prefix']:.0%}")


def test_a_window_longer_than_the_context_is_refused_by_field(packaged):
    plan = packaged.plan
    quality = plan.quality.model_copy(update={"window_len": packaged.max_seq_len + 1})
    packaged.plan = plan.model_copy(update={"quality": quality})
    try:
        with pytest.raises(ConfigError, match=r"quality.window_len \d+ exceeds max_seq_len"):
            CheckQuality().run(packaged, no_progress)
    finally:
        packaged.plan = plan
