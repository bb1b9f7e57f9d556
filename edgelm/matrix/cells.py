"""A matrix file's cells: each model × profile × variant resolved into the BuildPlan that
`edgelm build` would make of the same options, a bundle folder under OUT/bundles, and a hash of
the plan and of every file the build reads. An unchanged hash means an unchanged bundle, so a
second run reuses the cell."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgelm.config.matrix import VARIANT_OPTIONS, MatrixSpec
from edgelm.config.plan import DEFAULT_MODEL, BuildPlan
from edgelm.errors import ConfigError

BUNDLES = "bundles"


@dataclass(frozen=True)
class Cell:
    id: str                    # model/profile/variant, as tables show it
    model: str
    profile: str
    variant: dict[str, Any]
    plan: BuildPlan
    bundle: Path
    hash: str
    memory_bytes: int          # what its build task asks Ray for

    def record(self) -> dict[str, Any]:
        """The cell's identity as matrix.json records it (the results go beside it)."""
        return {"id": self.id, "hash": self.hash, "model": self.model, "profile": self.profile,
                "variant": self.variant, "bundle": str(self.bundle)}


def expand_cells(spec: MatrixSpec, source: str, output: Path) -> list[Cell]:
    """Every cell of `spec` (read from `source`), checked now: a bad profile, model or variant field
    fails here, named, before Ray starts."""
    from edgelm import api
    from edgelm.config.profile import load_profile
    from edgelm.matrix.resources import build_memory_bytes
    from edgelm.stages.load.model import locate_model

    for index, profile in enumerate(spec.profiles):
        _named(f"{source}: profiles[{index}]", load_profile, profile)
    for index, model in enumerate(spec.models):
        _named(f"{source}: models[{index}]", locate_model, model)
    cells, fingerprints = [], _Fingerprints()
    variants = spec.variant_list()
    for model in spec.models:
        for profile in spec.profiles:
            for index, variant in enumerate(variants):
                where = f"variants[{index}]" if isinstance(spec.variants, tuple) else "variants"
                cell_id = f"{_model_label(model)}/{profile}/{variant_label(variant)}"
                folder = _slug(cell_id)
                fields = {key: value for key, value in variant.items() if key not in VARIANT_OPTIONS}
                adapters = _adapters(variant.get("adapters"), Path(source).parent, f"{source}: {where}.adapters")
                plan = _named(f"{source}: {where} (cell {cell_id})", api.plan_build, profile=profile,
                              recipe=spec.recipe, model=model, name=folder, adapters=adapters,
                              accuracy_budget=variant.get("accuracy_budget"), fields=fields,
                              source=f"{source}: {where} (cell {cell_id})")
                memory = int(spec.resources.memory_gb * 2**30) if spec.resources.memory_gb else build_memory_bytes(plan)
                cells.append(Cell(id=cell_id, model=model, profile=profile, variant=variant, plan=plan,
                                  bundle=output / BUNDLES / folder, hash=fingerprints.cell_hash(plan), memory_bytes=memory))
    seen: dict[Path, str] = {}
    for cell in cells:
        if cell.bundle in seen:
            raise ConfigError(f"{source}: cells {seen[cell.bundle]} and {cell.id} would write the same bundle folder "
                              f"{cell.bundle.name}", hint="give the models distinct folder names, or name the variants")
        seen[cell.bundle] = cell.id
    return cells


def variant_label(variant: dict[str, Any]) -> str:
    if "name" in variant:
        return str(variant["name"])
    return ",".join(f"{key}={_short(value)}" for key, value in variant.items()) or "base"


class _Fingerprints:
    """sha256 of the sources a plan reads (model files, adapters, calibration and eval text), each
    file read once per run however many cells share it."""

    def __init__(self) -> None:
        self._seen: dict[str, str] = {}

    def cell_hash(self, plan: BuildPlan) -> str:
        import edgelm

        sources = {"model": self._model(plan.model),
                   "adapters": [self._file(Path(a.path) / "adapter_model.safetensors") for a in plan.adapters],
                   "files": {key: self._file(Path(value)) for key, value in _plan_files(plan).items()}}
        blob = json.dumps({"plan": plan.summary(), "sources": sources, "edgelm": edgelm.__version__}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def _model(self, model: str) -> str:
        from edgelm.stages.load.model import locate_model, source_fingerprint

        if model not in self._seen:
            self._seen[model] = source_fingerprint(*locate_model(model))
        return self._seen[model]

    def _file(self, path: Path) -> str | None:
        from edgelm_runtime.bundle import sha256_file

        key = str(path)
        if key not in self._seen:
            self._seen[key] = sha256_file(path) if path.is_file() else None
        return self._seen[key]


def _plan_files(plan: BuildPlan) -> dict[str, str]:
    values = {"calibration.source": plan.calibration.source, "quality.eval_text": plan.quality.eval_text,
              "quality.labelled_data": plan.quality.labelled_data}
    return {key: value for key, value in values.items() if value and value != "builtin"}


def _adapters(value: Any, base: Path, where: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ConfigError(f"{where}: a list of adapter folders (PATH or PATH:WEIGHT), got {value!r}",
                          hint="e.g. adapters: [adapters/sentiment]")
    return [item if Path(item).is_absolute() else str(base / item) for item in value]


def _named(where: str, function: Any, *args: Any, **kwargs: Any) -> Any:
    """Call `function`; a ConfigError it raises names the matrix field it came from."""
    from edgelm.errors import EdgelmError

    try:
        return function(*args, **kwargs)
    except EdgelmError as exc:
        message = exc.message if exc.message.startswith(where) else f"{where}: {exc.message}"
        raise ConfigError(message, hint=exc.hint) from None


def _model_label(model: str) -> str:
    if model == DEFAULT_MODEL:
        return "default"
    return Path(model).stem if model.endswith(".gguf") else Path(model).name


def _short(value: Any) -> str:
    return json.dumps(value, separators=(",", ":")) if isinstance(value, (list, dict)) else str(value)


def _slug(cell_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", cell_id.replace("/", "-")).strip("_")[:120]
