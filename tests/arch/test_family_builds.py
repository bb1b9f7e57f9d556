"""Every family through every stage that applies, as a user builds it: cpu-int8, cpu-int4 (AWQ,
mixed 4/8-bit, int4 embeddings), cpu-w8a8 (Hadamard rotations + static QDQ), npu-qdq where the family's
attention fits one mask (else refused by name), and a pruned build with a LoRA adapter merged.
Each build passes its profile's quality gates (the build fails otherwise) and the bundle answers."""

from __future__ import annotations

from pathlib import Path

import pytest

import edgelm_runtime as er
from edgelm.errors import QualityGateError, StageError

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3", "smollm3")
# npu-qdq takes one attention bias for every layer: families whose tiny config has a sliding window
# (16) shorter than the graphs' span are refused by the static export, by name
STATIC_REFUSED = {"mistral", "gemma3_text"}


def _build(model_dir: Path, recipe: Path, profile: str, out: Path, **options):
    from edgelm import api

    plan = api.plan_build(profile=profile, recipe=recipe, model=str(model_dir), name=out.name, **options)
    return api.build(plan, out)


def _answers(bundle: Path) -> None:
    manifest = er.read_manifest(bundle)
    llm = er.load_bundle(bundle, provider=manifest.quality["measured_on"])
    assert len(list(llm.generate_tokens(llm.tokenizer.encode("The weather"), max_new_tokens=4))) >= 1


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("profile", ["cpu-int8", "cpu-int4", "cpu-w8a8"])
def test_family_builds_and_passes_the_gates(family, profile, family_model_dirs, tiny_recipe, tmp_path, request):
    if (family, profile) == ("gemma3_text", "cpu-int4"):
        # Measured: the tiny random Gemma's next-token distributions are near uniform (ppl 397 of a
        # 387-token vocabulary) and its post-norms lift each branch's 4-bit error to full scale, so
        # near-ties flip: top-1 0.762 (< 0.80) at perplexity ratio 1.003; float embeddings 0.825.
        # strict: the build still runs, and once it passes, this marker must go.
        request.applymarker(pytest.mark.xfail(raises=QualityGateError, strict=True,
                                              reason="tiny random Gemma 3: top-1 0.762 < 0.80 on cpu-int4"))
    report = _build(family_model_dirs[family], tiny_recipe, profile, tmp_path / f"{family}-{profile}")
    manifest = report.manifest
    assert manifest.provenance["source"]["model_type"] == family
    assert manifest.quality["perplexity_ratio"] > 0  # measured; a missed gate fails the build itself
    _answers(report.output)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_npu_build_or_refusal(family, family_model_dirs, tiny_recipe, tmp_path):
    from tests.conftest import npu_profile

    profile = npu_profile(tmp_path)
    if family in STATIC_REFUSED:
        with pytest.raises(StageError, match="sliding-window"):
            _build(family_model_dirs[family], tiny_recipe, str(profile), tmp_path / family)
        assert not (tmp_path / family).exists()
        return
    report = _build(family_model_dirs[family], tiny_recipe, str(profile), tmp_path / family)
    assert report.manifest.static is not None
    _answers(report.output)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_pruned_with_adapter(family, family_model_dirs, tiny_recipe, tmp_path):
    from edgelm.arch import ARCHS
    from edgelm.config import BuildOverrides
    from tests.stages.test_adapters import make_adapter

    model_dir = family_model_dirs[family]
    adapter = make_adapter(model_dir, tmp_path / "lora", targets=ARCHS[family].linear_names())
    unpruned = _build(model_dir, tiny_recipe, "cpu-fp32", tmp_path / "base")
    report = _build(model_dir, tiny_recipe, "cpu-fp32", tmp_path / "pruned", adapters=[str(adapter)],
                    overrides=BuildOverrides(prune_mlp=0.5))
    manifest = report.manifest
    assert manifest.adapters and manifest.adapters[0]["merge_max_abs_diff"] < 1e-3
    assert manifest.pruning["params_after"] < manifest.pruning["params_before"]
    assert manifest.pruning["params_before"] == unpruned.manifest.provenance["source"]["parameters"]
    _answers(report.output)
