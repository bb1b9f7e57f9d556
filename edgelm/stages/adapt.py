"""Merge PEFT LoRA adapters into the fp32 model before anything else touches it, and prove it.

Merging by hand and then exporting and quantizing with three tools goes wrong silently (peft#638:
merged into an int8 base; llama.cpp#7062: a merged LoRA "loses training data"). edgelm merges into
the fp32 weights it is about to compress, with peft's own merge, one adapter at a time in order,
each delta scaled by its weight (peft's per-layer `set_scale`), and checks every merge: on a probe
batch the merged model's logits must equal the unmerged, adapter-applied PeftModel's.

What peft does not check and users hit, is checked first, from the files alone (no weights loaded):
pickle weights, a config from another adapter type, tensors whose shapes or module names belong to
another base model. Each is one line naming the adapter and the fix."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgelm.config.recipe import AdapterSpec
from edgelm.errors import AdapterError
from edgelm.pipeline.results import AdaptersResult
from edgelm.pipeline.stage import BuildState, Progress
from edgelm.stages.load.model import _first_line
from edgelm_runtime.bundle import sha256_file

logger = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
_PEFT_PREFIX = "base_model.model."
# tensor-name suffix -> what it is (peft's saved state dict, adapter name removed)
_LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B",
                  ".lora_magnitude_vector.weight", ".lora_magnitude_vector", ".lora_B.bias")
# logits of the merged and the unmerged model agree to this, relative to the largest logit
MERGE_RTOL = 1e-4
# an adapter that moves no logit by more than this did not change the model (untrained, B = 0)
NO_EFFECT_ATOL = 1e-6
PROBE_SAMPLES, PROBE_TOKENS = 4, 64


@dataclass(frozen=True)
class AdapterFiles:
    spec: AdapterSpec
    folder: Path
    config: dict[str, Any]
    shapes: dict[str, tuple[int, ...]]  # tensor name -> shape, read from the safetensors header
    sha256: str

    @property
    def label(self) -> str:
        return str(self.folder)

    @property
    def variant(self) -> str:
        return "dora" if self.config.get("use_dora") else "rslora" if self.config.get("use_rslora") else "lora"


def read_adapter(spec: AdapterSpec) -> AdapterFiles:
    """Check an adapter folder from its files (config, weights header) and fingerprint its weights."""
    folder = Path(spec.path).expanduser()
    if not folder.exists():
        raise AdapterError(f"{folder}: adapter path does not exist", hint="pass a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors)")
    if folder.is_file():
        raise AdapterError(f"{folder}: an adapter is a folder, not a file",
                           hint=f"pass the folder that holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    config = _read_config(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        pickled = [name for name in _PICKLE_FILES if (folder / name).is_file()]
        if pickled:
            raise AdapterError(f"{folder / pickled[0]}: pickle adapter weights are refused (they can run code when loaded)",
                               hint="convert once in a trusted environment: python -c \"import torch; from safetensors.torch import save_file; "
                                    f"save_file(torch.load('{pickled[0]}', weights_only=True), '{WEIGHTS_FILE}')\"")
        raise AdapterError(f"{folder}: no {WEIGHTS_FILE} in the adapter folder",
                           hint="save the adapter with save_pretrained() (safetensors is peft's default)")
    shapes = _read_shapes(weights)
    if not any(name.endswith(_LORA_SUFFIXES) for name in shapes):
        raise AdapterError(f"{weights}: holds no LoRA tensors (lora_A/lora_B)",
                           hint="the file is empty or not a LoRA adapter; save it again with peft")
    if config.get("use_dora") and spec.weight != 1.0:
        raise AdapterError(f"{folder}: a DoRA adapter merges only at weight 1.0 (got {spec.weight})",
                           hint="its magnitude vector rescales whole columns and does not scale with a weight; use :1.0")
    return AdapterFiles(spec=spec, folder=folder, config=config, shapes=shapes, sha256=sha256_file(weights))


def check_adapter_set(adapters: list[AdapterFiles]) -> None:
    """Combinations that have no well-defined weighted sum (among the adapters merged together)."""
    adapters = [a for a in adapters if a.spec.mode == "merge"]
    dora = [a for a in adapters if a.variant == "dora"]
    if dora and len(adapters) > 1:
        raise AdapterError(f"{dora[0].label}: a DoRA adapter cannot be combined with other adapters",
                           hint="build it alone; DoRA's magnitudes were trained against the base weights only")
    for adapter in adapters:
        if adapter.config.get("modules_to_save") and (len(adapters) > 1 or adapter.spec.weight != 1.0):
            raise AdapterError(f"{adapter.label}: modules_to_save ({', '.join(adapter.config['modules_to_save'])}) replace whole "
                               "modules and cannot be weighted or combined", hint="build this adapter alone at weight 1.0")


def check_against_model(adapter: AdapterFiles, model: Any) -> None:
    """Every tensor must target a module the model has, with the model's shapes: a mismatch means
    the adapter was made for another base (another architecture, hidden size or vocabulary)."""
    base = adapter.config.get("base_model_name_or_path") or "unknown"
    modules = dict(model.named_modules())
    for name, shape in adapter.shapes.items():
        module_name, kind = _split_tensor_name(name)
        module = modules.get(module_name)
        if module is None:
            raise AdapterError(f"{adapter.label}: targets {module_name}, which this {model.config.model_type} model lacks "
                               f"(adapter made for {base})", hint="use an adapter trained on this base model")
        expected = _expected_shape(module, kind, shape)
        if expected is not None and tuple(shape) != expected:
            raise AdapterError(f"{adapter.label}: {name} has shape {tuple(shape)} but this model needs {expected} "
                               f"(adapter made for another base: {base}; hidden size or vocabulary differ)",
                               hint="use an adapter trained on this base model")


def merge_adapters(model: Any, adapters: list[AdapterFiles], probe: list[list[int]],
                   progress: Progress | None = None) -> tuple[Any, list[dict[str, Any]]]:
    """Merge each adapter in order; returns the merged plain model and one record per adapter."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder only: never ask a hub
    records = []
    before = _logits(model, probe)
    for index, adapter in enumerate(adapters):
        if progress:
            progress("adapters", index, len(adapters), f"merging {adapter.folder.name}")
        check_against_model(adapter, model)
        try:
            wrapped = PeftModel.from_pretrained(model, str(adapter.folder), adapter_name="edgelm", is_trainable=False)
        except Exception as exc:  # peft raises ValueError/TypeError/RuntimeError for configs it cannot apply
            raise AdapterError(f"{adapter.label}: peft cannot apply this adapter ({_first_line(exc)})",
                               hint="check that it is a LoRA adapter for this base, saved by a compatible peft") from exc
        for layer in wrapped.modules():
            if isinstance(layer, LoraLayer):
                layer.set_scale("edgelm", adapter.spec.weight)
        unmerged = _logits(wrapped, probe)
        try:
            model = wrapped.merge_and_unload()
        except Exception as exc:
            raise AdapterError(f"{adapter.label}: peft cannot merge this adapter ({_first_line(exc)})",
                               hint="LoRA, rsLoRA and DoRA on Linear/Embedding layers merge; other variants do not") from exc
        merged = _logits(model, probe)
        scale = max(1.0, max(float(t.abs().max()) for t in unmerged))
        diff = max(float((a - b).abs().max()) for a, b in zip(merged, unmerged))
        shift = max(float((a - b).abs().max()) for a, b in zip(merged, before))
        if diff > MERGE_RTOL * scale:
            raise AdapterError(f"{adapter.label}: merged logits differ from the adapter-applied model by {diff:.3g} "
                               f"(limit {MERGE_RTOL * scale:.3g})", hint="report this with the adapter's adapter_config.json")
        if shift <= NO_EFFECT_ATOL:
            logger.warning("%s: merging this adapter changed no logit (max shift %.2g); is it trained?", adapter.label, shift)
        records.append({"path": str(adapter.folder.resolve()), "sha256": adapter.sha256, "weight": adapter.spec.weight,
                        "variant": adapter.variant, "rank": adapter.config.get("r"), "alpha": adapter.config.get("lora_alpha"),
                        "tensors": len(adapter.shapes), "merge_max_abs_diff": diff, "logit_shift": shift,
                        "no_effect": shift <= NO_EFFECT_ATOL})
        before = merged
        del wrapped
    return model.eval(), records


class MergeAdapters:
    name = "adapters"
    title = "Merge LoRA adapters (verified against the unmerged model)"

    def run(self, state: BuildState, progress: Progress) -> AdaptersResult:
        from edgelm.calibration import calibration_token_ids

        if not state.plan.adapters:
            return AdaptersResult(adapters=0)
        adapters = read_adapters(state.plan.adapters)
        merged = [a for a in adapters if a.spec.mode == "merge"]
        records: list[dict[str, Any]] = []
        if merged:
            probe = calibration_token_ids(state.plan.calibration.source, state.tokenizer, state.chat_template,
                                          PROBE_SAMPLES, PROBE_TOKENS)
            state.model, records = merge_adapters(state.model, merged, probe, progress)
        kept = [a for a in adapters if a.spec.mode == "runtime"]
        if kept:  # kept apart: edgelm/stages/runtime_adapters.py
            return keep_for_runtime(state, kept, records)
        return merged_result(records)


def merged_result(records: list[dict[str, Any]], **fields: Any) -> AdaptersResult:
    warnings = [f"{Path(r['path']).name}: merging it changed no logit" for r in records if r["no_effect"]]
    if not records:
        return AdaptersResult(adapters=0, **fields)
    return AdaptersResult(adapters=len(records), merge_max_abs_diff=max(r["merge_max_abs_diff"] for r in records),
                          logit_shift=max(r["logit_shift"] for r in records), warnings=warnings, merged=records, **fields)


def keep_for_runtime(state: BuildState, kept: list[AdapterFiles], records: list[dict[str, Any]]) -> AdaptersResult:
    from edgelm.errors import ConfigError
    from edgelm.stages.runtime_adapters import read_runtime_adapter, transforms_off

    if state.encoder is not None:
        raise ConfigError("adapter_mode runtime: encoder bundles take merged adapters only",
                          hint="merge the adapters (adapter_mode merge) for an encoder build")
    adapters = tuple(read_runtime_adapter(files, state.model) for files in kept)
    return merged_result(records, runtime=[a.record() for a in adapters],
                         transforms_off=transforms_off(state.plan) or None, kept=adapters)


def read_adapters(specs: tuple[AdapterSpec, ...] | list[AdapterSpec]) -> list[AdapterFiles]:
    """Read and check every adapter of a plan (files only); `sha256` in a spec must still match."""
    adapters = [read_adapter(spec) for spec in specs]
    for adapter in adapters:
        if adapter.spec.sha256 and adapter.spec.sha256 != adapter.sha256:
            raise AdapterError(f"{adapter.label}: {WEIGHTS_FILE} changed since the bundle was built "
                               f"(sha256 {adapter.sha256[:12]}..., recorded {adapter.spec.sha256[:12]}...)",
                               hint="restore the adapter, or pass --adapter to build with the new one")
    check_adapter_set(adapters)
    return adapters


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise AdapterError(f"{folder}: no {CONFIG_FILE} in the adapter folder",
                           hint="pass the folder written by PeftModel.save_pretrained()")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{path}: cannot read the adapter config ({_first_line(exc)})",
                           hint="it must be the JSON file peft writes; save the adapter again") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{path}: expected a JSON object", hint="save the adapter again with peft")
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise AdapterError(f"{path}: peft_type {peft_type!r} is not supported",
                           hint="edgelm merges LoRA adapters (plain, rsLoRA, DoRA); merge other types with peft first")
    return config


def _read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except Exception as exc:  # safetensors raises SafetensorError for truncated/corrupt headers
        raise AdapterError(f"{path}: cannot read the adapter weights ({_first_line(exc)})",
                           hint="the file is truncated or corrupt; copy or save the adapter again") from None


def _split_tensor_name(name: str) -> tuple[str, str]:
    """(module path, "lora_A.weight") from peft's saved tensor name (the path as the base model names it)."""
    bare = name[len(_PEFT_PREFIX):] if name.startswith(_PEFT_PREFIX) else name
    for suffix in _LORA_SUFFIXES:
        if bare.endswith(suffix):
            return bare[: -len(suffix)], suffix[1:]
    if bare.endswith(".base_layer.weight"):  # peft's save_embedding_layers: the whole base weight
        return bare[: -len(".base_layer.weight")], "weight"
    module, _, leaf = bare.rpartition(".")  # modules_to_save: a whole parameter (the output head's weight)
    return module, leaf


def _expected_shape(module: Any, kind: str, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The shape `kind` must have on `module` (rank taken from the tensor itself)."""
    rank = shape[0] if kind in ("lora_A.weight", "lora_embedding_A") else shape[-1]
    if hasattr(module, "in_features"):  # Linear
        return {"lora_A.weight": (rank, module.in_features), "lora_B.weight": (module.out_features, rank),
                "lora_magnitude_vector": (module.out_features,),
                "lora_magnitude_vector.weight": (module.out_features,), "lora_B.bias": (module.out_features,),
                "weight": tuple(module.weight.shape), "bias": (module.out_features,)}.get(kind)
    if hasattr(module, "num_embeddings"):  # Embedding: A is (r, vocab), B is (dim, r)
        return {"lora_embedding_A": (rank, module.num_embeddings), "lora_embedding_B": (module.embedding_dim, rank),
                "weight": tuple(module.weight.shape)}.get(kind)
    return None


def _logits(model: Any, probe: list[list[int]]) -> list[Any]:
    import torch

    with torch.no_grad():
        outputs = [model(torch.tensor([ids])) for ids in probe]
    # a bare encoder (feature-extraction) has no logits: its token vectors are what the adapter changes
    return [(out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state)[0].float()
            for out in outputs]
