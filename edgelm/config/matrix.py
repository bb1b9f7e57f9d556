"""Matrix files for `edgelm matrix`: models × profiles × variants, what each cell runs, the gates
that pick one bundle per device, and which Ray nodes benchmark for each device. YAML, validated,
closed, like recipes. edgelm/matrix/cells.py turns it into one BuildPlan per cell."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from edgelm.config._yaml import load_yaml_model
from edgelm.config.profile import Frozen
from edgelm.errors import ConfigError

Step = Literal["build", "eval", "bench"]
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
# variant keys besides dotted plan fields (prune.mlp_fraction, quality.max_perplexity_ratio, ...)
VARIANT_OPTIONS = ("name", "adapters", "accuracy_budget")


class BenchDevice(Frozen):
    """A target device: its bench cells run only on Ray nodes that have `resource` (started with
    `ray start --resources '{"device:pi5": 1}'`); without one, on any node. One bench at a time
    holds the resource, so benchmarks on a device never overlap."""
    name: str = Field(pattern=_NAME)
    resource: str | None = Field(None, min_length=1)
    profiles: tuple[str, ...] = Field((), description="profiles benchmarked on this device (default: every profile)")


class BenchSettings(Frozen):
    threads: int | None = Field(None, ge=1, le=256, description="None: the bundle's manifest")
    repeats: int = Field(3, ge=1, le=100)
    warmup: int = Field(1, ge=0, le=20)
    decode_tokens: int = Field(64, ge=1, le=4096)
    # a bench holds this many CPUs of its node, so no build runs beside it and skews the timing;
    # None: all the CPUs of the smallest node that can run it (2 on a 2-core node)
    cpus: float | None = Field(None, gt=0)
    devices: tuple[BenchDevice, ...] = (BenchDevice(name="local"),)

    @field_validator("devices")
    @classmethod
    def _distinct(cls, value: tuple[BenchDevice, ...]) -> tuple[BenchDevice, ...]:
        names = [device.name for device in value]
        if not value or len(set(names)) != len(names):
            raise ValueError(f"need at least one device and distinct names (got {names})")
        return value


class EvalSettings(Frozen):
    """`edgelm eval` per cell, beyond the build's own quality check: task accuracy against fp32."""
    tasks: tuple[Literal["sentiment", "topic", "capitals", "yesno"], ...] = ("sentiment", "topic")
    samples: int = Field(50, ge=1, le=10_000)
    shots: tuple[int, ...] = (0,)


class MatrixGates(Frozen):
    """What a bundle must meet to be picked for a device (the builds keep their own gates)."""
    max_perplexity_ratio: float | None = Field(None, gt=1.0)
    min_top1_agreement: float | None = Field(None, ge=0.0, le=1.0)
    max_kl_divergence: float | None = Field(None, gt=0.0)
    min_chat_identical: float | None = Field(None, ge=0.0, le=1.0)
    max_size_mb: float | None = Field(None, gt=0.0)
    max_accuracy_drop: float | None = Field(None, ge=0.0, le=1.0, description="needs eval in run")


class BuildResources(Frozen):
    cpus: float = Field(1, gt=0, description="CPUs a build task holds on its node")
    # None: estimated from the model's fp32 weight bytes (edgelm/matrix/resources.py), so Ray does
    # not place two builds that together need more memory than a node has
    memory_gb: float | None = Field(None, gt=0)
    retries: int = Field(2, ge=0, le=10, description="reruns of a build whose worker died (Ray max_retries)")


class MatrixSpec(Frozen):
    name: str = Field("matrix", pattern=_NAME)
    recipe: str | None = Field(None, description="a recipe every cell starts from (its model/profile are the matrix's)")
    models: tuple[str, ...] = Field(min_length=1)
    profiles: tuple[str, ...] = Field(min_length=1)
    # axes (field -> values, every combination) or a list of named variants (each a set of fields)
    variants: dict[str, tuple[Any, ...]] | tuple[dict[str, Any], ...] = ({},)
    run: tuple[Step, ...] = ("build",)
    gates: MatrixGates = MatrixGates()
    eval: EvalSettings = EvalSettings()
    bench: BenchSettings = BenchSettings()
    resources: BuildResources = BuildResources()

    @field_validator("run")
    @classmethod
    def _steps(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if "build" not in value:
            raise ValueError(f"must include build: eval and bench run on the cell's bundle (got {list(value)})")
        return tuple(step for step in ("build", "eval", "bench") if step in value)

    @field_validator("variants")
    @classmethod
    def _variants(cls, value: Any) -> Any:
        if isinstance(value, dict):
            for key, values in value.items():
                if key == "name":
                    raise ValueError("name: names belong to listed variants (variants: [{name: ..., ...}])")
                if not values:
                    raise ValueError(f"{key}: needs at least one value")
            settings = [{key: item} for key, values in value.items() for item in values]
        else:
            settings = list(value)
        for setting in settings:  # a plan field set to null would be read as "not given": refused, not ignored
            for key, item in setting.items():
                if item is None:
                    raise ValueError(f"{key}: null is not a value here (leave the field out for its default)")
        return value or ({},)

    @model_validator(mode="after")
    def _device_profiles(self) -> "MatrixSpec":
        for device in self.bench.devices:
            unknown = sorted(set(device.profiles) - set(self.profiles))
            if unknown:
                raise ValueError(f"bench.devices: {device.name} names profiles the matrix does not build: {unknown}")
        if self.gates.max_accuracy_drop is not None and "eval" not in self.run:
            raise ValueError("gates.max_accuracy_drop needs eval in run (task accuracy is measured by eval)")
        return self

    def variant_list(self) -> list[dict[str, Any]]:
        """Every variant as its fields: the listed ones, or each combination of the axes' values."""
        if not isinstance(self.variants, dict):
            return [dict(variant) for variant in self.variants]
        combos: list[dict[str, Any]] = [{}]
        for key, values in self.variants.items():
            combos = [{**combo, key: value} for combo in combos for value in values]
        return combos


def load_matrix(path: str | Path) -> MatrixSpec:
    """Relative paths (models, the recipe) are read from the matrix file's folder."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: matrix file not found", hint="check the path (examples/matrix-smoke.yaml is one)")
    spec = load_yaml_model(path, MatrixSpec, "matrix")

    def local(value: str) -> str:
        from edgelm.stages.load.model import looks_like_hub_name

        candidate = path.parent / value
        if value == "default" or Path(value).is_absolute() or (looks_like_hub_name(value) and not candidate.exists()):
            return value
        return str(candidate.resolve())

    return spec.model_copy(update={"models": tuple(local(model) for model in spec.models),
                                   "recipe": local(spec.recipe) if spec.recipe else None})
