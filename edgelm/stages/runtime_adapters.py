"""Runtime LoRA adapters (`adapter_mode: runtime`): kept apart from the weights, switched per request.

The base graph gets a LoRA path on every projection an adapter targets (export/lora.py); each
adapter becomes an onnxruntime adapter file (`adapters/NAME.onnx_adapter`: A = lora_A^T, B =
lora_B^T * scale, scale = weight * alpha / r, or / sqrt(r) for rsLoRA) that
`RunOptions.add_active_adapter` feeds into it. Only what adds as x A B can be kept apart: plain
LoRA and rsLoRA on Linear layers. DoRA (a magnitude rescaling whole columns), embedding LoRA,
LoRA biases and modules_to_save are refused with the reason (merge them instead).

Transforms that change a projection's input or output coordinates before export (Hadamard
rotations, AWQ and SmoothQuant scales) would have to be applied to every adapter too, also to one
added later with --add-adapter; a runtime build turns them off (runtime_plan) and says so."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgelm.errors import AdapterError, ConfigError, StageError
from edgelm.quant.graph import relative_module
from edgelm.stages.adapt import WEIGHTS_FILE, AdapterFiles, _split_tensor_name, check_against_model
from edgelm.stages.export.lora import LoraSite, input_names

logger = logging.getLogger(__name__)

ADAPTERS_DIR = "adapters"
ADAPTER_SUFFIX = ".onnx_adapter"
# prep fields that move a projection's coordinates, and the value that turns each off
_COORDINATE_TRANSFORMS = {"rotation": "none", "activation_aware": False, "smoothquant_alpha": None}


@dataclass(frozen=True)
class RuntimeAdapter:
    """One adapter kept for run time: its files and its LoRA factors per module (relative path),
    A (in, r) and B (r, out) with the scale folded into B, float32."""

    files: AdapterFiles
    factors: dict[str, tuple[np.ndarray, np.ndarray]]

    @property
    def name(self) -> str:
        return self.files.spec.adapter_name

    @property
    def rank(self) -> int:
        return max(a.shape[1] for a, _ in self.factors.values())

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(sorted(self.factors))

    def parameters(self, dtype: str) -> dict[str, np.ndarray]:
        """The adapter file's tensors: the graph's input names -> values in the graph's dtype."""
        values = {}
        for module, (a, b) in self.factors.items():
            a_name, b_name = input_names(module)
            values[a_name], values[b_name] = a.astype(dtype), b.astype(dtype)
        return values

    def record(self) -> dict[str, Any]:
        spec, config = self.files.spec, self.files.config
        return {"name": self.name, "path": str(self.files.folder.resolve()), "sha256": self.files.sha256,
                "weight": spec.weight, "variant": self.files.variant, "rank": self.rank,
                "alpha": config.get("lora_alpha"), "targets": len(self.factors)}


def runtime_plan(plan: Any) -> Any:
    """The plan a runtime-adapter build runs: refused where the graph cannot take adapters, the
    coordinate-moving prep passes turned off (recorded in the plan, so a rebuild does the same)."""
    from edgelm.quant import scheme_for

    if not any(a.mode == "runtime" for a in plan.adapters):
        return plan
    profile = plan.profile
    if profile.export.static_shapes:
        raise ConfigError(f"adapter_mode runtime: profile {profile.name} has fixed-shape graphs (export.static_shapes), "
                          "which cannot take an adapter of any rank", hint="merge the adapters (adapter_mode merge) for this device")
    refusal = scheme_for(profile.quantization).adapter_refusal
    if refusal:
        raise ConfigError(f"adapter_mode runtime: profile {profile.name}: {refusal}",
                          hint="merge the adapters (adapter_mode merge), or use a cpu-* profile")
    if plan.prune is not None:
        raise ConfigError("adapter_mode runtime: prune changes the matrices the adapters were trained for",
                          hint="merge the adapters (adapter_mode merge), or build without prune")
    quantization = profile.quantization
    changes = {name: off for name, off in _COORDINATE_TRANSFORMS.items()
               if name in type(quantization).model_fields and getattr(quantization, name) != off}
    if not changes:
        return plan
    logger.warning("runtime adapters: %s turned off (an adapter's factors would have to move with them)",
                   ", ".join(changes))
    quantization = quantization.model_copy(update=changes)
    return plan.model_copy(update={"profile": profile.model_copy(update={"quantization": quantization})})


def transforms_off(plan: Any) -> list[str]:
    """The coordinate-moving prep passes the named profile has on and `plan` (runtime_plan) has off."""
    from edgelm.config.profile import load_profile

    try:
        named = load_profile(plan.profile.name).quantization
    except ConfigError:  # a profile given as a file that is gone: nothing to compare with
        return []
    ours = plan.profile.quantization
    return [name for name, off in _COORDINATE_TRANSFORMS.items() if name in type(ours).model_fields
            and type(named) is type(ours) and getattr(named, name) != off and getattr(ours, name) == off]


def read_runtime_adapter(files: AdapterFiles, model: Any) -> RuntimeAdapter:
    """Check that the adapter adds as x A B, and read its factors with the scale folded into B."""
    from safetensors import safe_open

    check_against_model(files, model)
    config, label = files.config, files.label
    refused = [("use_dora", "a DoRA adapter rescales whole weight columns"),
               ("modules_to_save", "modules_to_save replace whole modules"),
               ("lora_bias", "a LoRA bias is not a low-rank product"),
               ("fan_in_fan_out", "fan_in_fan_out (Conv1D) weights are not Linear layers")]
    for key, reason in refused:
        if config.get(key):
            raise AdapterError(f"{label}: cannot be kept for run time: {reason}", hint="merge it (adapter_mode merge)")
    tensors: dict[str, dict[str, np.ndarray]] = {}
    with safe_open(str(files.folder / WEIGHTS_FILE), framework="numpy") as handle:
        for name in handle.keys():
            module, kind = _split_tensor_name(name)
            if kind not in ("lora_A.weight", "lora_B.weight"):
                raise AdapterError(f"{label}: cannot be kept for run time: {name} is not a Linear layer's "
                                   "lora_A/lora_B", hint="merge it (adapter_mode merge)")
            tensors.setdefault(relative_module(module), {})[kind] = handle.get_tensor(name).astype(np.float32)
    factors = {}
    for module, pair in tensors.items():
        if len(pair) != 2:
            raise AdapterError(f"{label}: {module} has only {', '.join(pair)}", hint="save the adapter again with peft")
        a, b = pair["lora_A.weight"], pair["lora_B.weight"]
        rank = a.shape[0]
        alpha = _pattern(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", rank))
        scale = files.spec.weight * alpha / (np.sqrt(rank) if config.get("use_rslora") else rank)
        factors[module] = (np.ascontiguousarray(a.T), np.ascontiguousarray(b.T * scale))
    return RuntimeAdapter(files=files, factors=factors)


def _pattern(patterns: dict[str, Any], module: str, default: Any) -> float:
    """peft's per-module override (alpha_pattern): a key the module path ends with."""
    for key, value in patterns.items():
        if module == key or module.endswith("." + key):
            return float(value)
    return float(default)


def lora_sites(model: Any, graph_modules: set[str], targets: set[str]) -> list[LoraSite]:
    """The graph MatMuls that get a LoRA path for `targets` (module paths): the projection's own
    MatMul, or the packed one computing it with its siblings (the arch says which)."""
    from edgelm.arch import for_model
    from edgelm.arch.base import ATTENTION_INPUT, MLP_INPUT

    arch, config = for_model(model), model.config
    packed: dict[str, LoraSite] = {}
    for index, layer in enumerate(arch.layers(model)):
        prefix = f"{arch.layers_prefix}.{index}."
        for roles in (ATTENTION_INPUT, MLP_INPUT):
            site = relative_module(prefix + arch.packed_path(roles))
            members = tuple(dict.fromkeys((relative_module(prefix + arch.projections[r]),
                                           int(arch.role(layer, r, config).weight.shape[0])) for r in roles))
            packed.update({member: LoraSite(site, members) for member, _ in members if member != site})
    linears = {relative_module(name): module for name, module in model.named_modules() if hasattr(module, "out_features")}
    sites: dict[str, LoraSite] = {}
    for target in sorted(targets):
        if target in graph_modules and target in linears:
            sites.setdefault(target, LoraSite(target, ((target, int(linears[target].out_features)),)))
        elif target in packed and packed[target].module in graph_modules:
            sites.setdefault(packed[target].module, packed[target])
        else:
            raise StageError("export", f"an adapter targets {target}, which the exported graph has no MatMul for",
                             hint="merge the adapters (adapter_mode merge), or report this model")
    return list(sites.values())


def adapter_dtype(plan: Any) -> str:
    from edgelm.quant import scheme_for

    return scheme_for(plan.profile.quantization).adapter_dtype


def attach_lora(state: Any, path: Path, adapters: tuple[RuntimeAdapter, ...]) -> int:
    """Give the exported graph at `path` the LoRA inputs the adapters target (in place); returns how
    many (A, B) pairs it has."""
    import onnx

    from edgelm.onnx_graph import save_external
    from edgelm.quant.graph import weight_matmuls
    from edgelm.stages.export.lora import add_lora_paths, lora_inputs

    model = onnx.load(str(path), load_external_data=True)
    targets = {module for adapter in adapters for module in adapter.factors}
    sites = lora_sites(state.model, set(weight_matmuls(model).values()), targets)
    added = add_lora_paths(model, sites, adapter_dtype(state.plan))
    found = lora_inputs(model.graph)
    if added != len(found) or not targets <= set(found):
        raise StageError("export", f"the LoRA path has {len(found)} input pairs, {added} were added",
                         hint="report this with --debug")
    save_external(model, path)
    return added


@contextlib.contextmanager
def peft_applied(model: Any, adapter: RuntimeAdapter) -> Iterator[Any]:
    """`model` with the adapter applied by peft (unmerged, scaled by its weight); restored after."""
    import os

    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    wrapped = PeftModel.from_pretrained(model, str(adapter.files.folder), adapter_name="edgelm", is_trainable=False)
    for layer in wrapped.modules():
        if isinstance(layer, LoraLayer):
            layer.set_scale("edgelm", adapter.files.spec.weight)
    try:
        yield wrapped
    finally:
        wrapped.unload()


def write_adapter_file(path: Path, parameters: dict[str, np.ndarray]) -> None:
    """An onnxruntime adapter file (flatbuffers; no pickle) holding `parameters` by input name."""
    import onnxruntime as ort

    path.parent.mkdir(parents=True, exist_ok=True)
    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(1)
    adapter.set_model_version(1)
    adapter.set_parameters({name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value))
                            for name, value in parameters.items()})
    adapter.export_adapter(str(path))
