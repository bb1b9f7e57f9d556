"""Chat fidelity: greedy chat answers of a bundle against its reference, checked on every build."""

from __future__ import annotations

import numpy as np
import pytest

from edgelm.eval.chat_data import held_out_chat_prompts
from edgelm.eval.chat_fidelity import chat_fidelity, held_out_prompt_ids


def _prompts(llm, count=6, tokens=8):
    return held_out_prompt_ids(llm, count, tokens)


def test_a_bundle_against_itself_is_exact(tiny_bundle):
    import edgelm_runtime as er

    llm = er.load_bundle(tiny_bundle)
    prompts = _prompts(llm)
    chat = chat_fidelity(llm, llm, prompts, 8)
    assert chat["prompts"] == 6 and chat["identical"] == chat["mean_prefix"] == chat["first_token"] == 1.0
    assert chat["same_top1"] == 1.0 and chat["kl_max"] == pytest.approx(0.0, abs=1e-6) and chat["rms_delta_p"] < 1e-6


class Noisy:
    """A bundle whose logits carry noise: a stand-in for a damaged quantization."""

    def __init__(self, llm, scale):
        self.llm, self.scale, self.rng = llm, scale, np.random.default_rng(0)

    def logits(self, ids):
        logits = self.llm.logits(ids)
        return logits + self.rng.normal(0, self.scale, logits.shape).astype(np.float32)

    def greedy(self, ids, tokens):
        out = []
        for _ in range(tokens):
            out.append(int(self.logits([*ids, *out])[-1].argmax()))
        return out, False


def test_noise_lowers_every_number_in_order(tiny_bundle):
    import edgelm_runtime as er

    llm = er.load_bundle(tiny_bundle)
    prompts = _prompts(llm)
    mild, strong = (chat_fidelity(Noisy(llm, s), llm, prompts, 8) for s in (0.05, 3.0))
    assert strong["identical"] < 1.0 and strong["same_top1"] < mild["same_top1"] <= 1.0
    assert strong["kl_mean"] > mild["kl_mean"] > 0 and strong["rms_delta_p"] > mild["rms_delta_p"]


def test_the_quality_check_reports_chat_numbers_and_a_missed_chat_gate_fails_the_build(tiny_model_dir, tmp_path):
    from edgelm import api
    from edgelm.errors import QualityGateError
    from tests.conftest import TINY_RECIPE

    recipe = tmp_path / "r.yaml"
    recipe.write_text(TINY_RECIPE)
    report = api.build(api.plan_build(profile="cpu-int4", recipe=recipe, model=str(tiny_model_dir)), tmp_path / "ok")
    chat = report.manifest.quality["chat"]
    assert chat["prompts"] == 6 and chat["tokens"] == 8 and 0 <= chat["identical"] <= 1
    assert "answers identical" in report.results["quality"].note()
    strict = tmp_path / "strict.yaml"
    strict.write_text(TINY_RECIPE.replace("chat_tokens: 8}", "chat_tokens: 8, max_chat_kl: 1.0e-9}"))
    with pytest.raises(QualityGateError, match="chat KL .* > 1e-09"):
        api.build(api.plan_build(profile="cpu-int4", recipe=strict, model=str(tiny_model_dir)), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()  # nothing half-written


def test_the_chat_set_is_fixed_mixed_and_disjoint_from_calibration():
    from edgelm.calibration import builtin_prompts

    prompts = held_out_chat_prompts()
    assert prompts == held_out_chat_prompts() and len(prompts) == len(set(prompts)) > 200
    assert not set(prompts) & set(builtin_prompts())
    assert "What is AI?" in prompts and any("Hawaii" in p for p in prompts[:160])  # both sources, alternated
