"""The library API that the CLI and tests call: plan_build(), build(), inspect_bundle().

`PIPELINE` is the whole build, in order. Package runs before CheckQuality because the quality
check evaluates the finished bundle through edgelm_runtime; the manifest is then completed
with the quality numbers and published atomically."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgelm.config.plan import BuildPlan, resolve
from edgelm.config.profile import load_profile
from edgelm.config.recipe import Recipe, load_recipe
from edgelm.errors import ConfigError
from edgelm.eval.text import load_eval_text
from edgelm.pipeline.runner import run_stages
from edgelm.pipeline.stage import BuildState, Progress, no_progress
from edgelm.pipeline.workspace import Workspace
from edgelm.stages.check_quality import CheckQuality
from edgelm.stages.export import ExportOnnx
from edgelm.stages.fuse import FuseGraph
from edgelm.stages.awq import ActivationAwareScales
from edgelm.stages.calibration import read_calibration_file
from edgelm.stages.load import LoadModel, locate_model
from edgelm.stages.package import Package, finalize_manifest
from edgelm.stages.quantize import Quantize
from edgelm.stages.sensitivity import MeasureSensitivity
from edgelm.stages.smooth import Smooth
from edgelm_runtime.bundle import Manifest

logger = logging.getLogger(__name__)

PIPELINE = (LoadModel(), Smooth(), ActivationAwareScales(), MeasureSensitivity(), ExportOnnx(), FuseGraph(), Quantize(), Package(), CheckQuality())


@dataclass(frozen=True)
class BuildReport:
    output: Path
    manifest: Manifest
    seconds: dict[str, float]
    facts: dict[str, dict[str, Any]]


def plan_build(profile: str | None = None, recipe: str | Path | None = None, model: str | None = None,
               name: str | None = None, overrides: dict[str, Any] | None = None,
               accuracy_budget: float | None = None) -> BuildPlan:
    """Resolve profile + recipe + options into a BuildPlan; --profile beats the recipe's profile.

    `accuracy_budget` (a perplexity ratio, e.g. 1.02) becomes the perplexity gate and turns on the
    mixed-precision search, which keeps the fewest MatMuls in fp32 that meet it."""
    loaded = load_recipe(recipe) if recipe else Recipe()
    device = load_profile(profile or loaded.profile or "cpu-int8")
    merged = {"model": model, "name": name, **(overrides or {})}
    if accuracy_budget is not None:
        if device.quantization.mode != "static-qdq":
            raise ConfigError(f"--accuracy-budget needs a static-qdq profile ({device.name} is {device.quantization.mode})",
                              hint="use --profile cpu-w8a8, or leave out --accuracy-budget")
        merged.update({"quality.max_perplexity_ratio": accuracy_budget, "profile.quantization.mixed_precision": "auto"})
    return resolve(loaded, device, merged)


def preflight(plan: BuildPlan) -> None:
    """Check the user's inputs before any heavy work, so a typo fails in a second, not a minute."""
    locate_model(plan.model)
    if plan.calibration.source != "builtin":
        read_calibration_file(Path(plan.calibration.source))
    load_eval_text(plan.quality.eval_text)


def build(plan: BuildPlan, output: str | Path, force: bool = False, progress: Progress = no_progress) -> BuildReport:
    Workspace(Path(output), force=force).check_output()
    preflight(plan)
    with Workspace(Path(output), force=force) as workspace:
        state = BuildState(plan=plan, work_dir=workspace.work_dir, bundle_dir=workspace.bundle_dir)
        run_stages(PIPELINE, state, progress)
        manifest = finalize_manifest(state, quality=state.facts.get(CheckQuality.name, {}))
        published = workspace.publish()
    return BuildReport(output=published, manifest=manifest, seconds=dict(state.seconds), facts=state.facts)
