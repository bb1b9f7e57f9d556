"""Tiny runtime-adapter bundles: the tiny Llama with two tiny adapters kept for run time (cpu-fp32
and cpu-int8), and the same adapters merged one at a time (cpu-fp32) to compare with."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.stages.test_adapters import make_adapter


@pytest.fixture(scope="session")
def tiny_adapters(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runtime-adapters")
    return {"sentiment": make_adapter(tiny_model_dir, root / "sentiment", seed=1),
            "tone": make_adapter(tiny_model_dir, root / "tone", seed=2, rank=2,
                                 targets=("q_proj", "k_proj", "o_proj", "up_proj"))}


def build_runtime(model_dir: Path, recipe: Path, profile: str, adapters: list[str], out: Path):
    from edgelm import api

    plan = api.plan_build(profile=profile, recipe=recipe, model=str(model_dir), adapters=adapters,
                          adapter_mode="runtime", name=out.name)
    return api.build(plan, out)


@pytest.fixture(scope="session")
def runtime_bundles(tiny_model_dir, tiny_recipe, tiny_adapters, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runtime-bundles")
    adapters = [str(path) for path in tiny_adapters.values()]
    return {profile: build_runtime(tiny_model_dir, tiny_recipe, profile, adapters, root / profile).output
            for profile in ("cpu-fp32", "cpu-int8")}


@pytest.fixture(scope="session")
def merged_bundles(tiny_model_dir, tiny_recipe, tiny_adapters, tmp_path_factory) -> dict[str, Path]:
    from edgelm import api

    root = tmp_path_factory.mktemp("merged-bundles")
    return {name: api.build(api.plan_build(profile="cpu-fp32", recipe=tiny_recipe, model=str(tiny_model_dir),
                                           adapters=[str(path)], name=name), root / name).output
            for name, path in tiny_adapters.items()}
