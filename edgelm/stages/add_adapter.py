"""`edgelm build --from-bundle B --add-adapter NEW -o OUT`: one more runtime adapter for a bundle
built with `--adapter-mode runtime`, without rebuilding (or re-quantizing) its base.

Checked from the files first, in a second: the new adapter must target modules the graph has LoRA
inputs for, with their in/out sizes (the rank dimension is symbolic: any rank fits), and its name
must be new. Then the source model is loaded (its sha256 checked as for any --from-bundle build),
the bundle's merged adapters merged again, and the adapter written and measured as a build does
(package_adapters.prove: quality against the fp32 model with it merged). The copy is made in a
temporary folder beside OUT and moved into place at the end; an existing OUT needs --force."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import onnx

from edgelm.config.recipe import AdapterSpec, parse_adapter
from edgelm.errors import AdapterError, ConfigError
from edgelm.pipeline.stage import BuildState, Progress
from edgelm.pipeline.workspace import Workspace
from edgelm.quant.graph import relative_module
from edgelm.stages.adapt import _split_tensor_name, merge_adapters, read_adapter, read_adapters
from edgelm.stages.export.lora import lora_inputs
from edgelm.stages.package_adapters import prove, write_adapter
from edgelm.stages.runtime_adapters import read_runtime_adapter
from edgelm_runtime.bundle import Manifest, describe_files, verify_bundle, write_manifest

STAGE = "add-adapter"


def check_fits(bundle: Path, files: Any, inputs: dict[str, tuple[int, int, int]]) -> None:
    """Every tensor of the adapter must meet a LoRA input of the graph, with its sizes."""
    have = sorted({m.rsplit(".", 1)[-1] for m in inputs})
    for name, shape in files.shapes.items():
        module, kind = _split_tensor_name(name)
        module = relative_module(module)
        if module not in inputs:
            raise AdapterError(f"{files.label}: targets {module}, which {bundle} has no adapter inputs for "
                               f"(it takes {', '.join(have)})",
                               hint="train the adapter on those modules, or rebuild the bundle with both adapters")
        width, out, _ = inputs[module]
        fits = (kind == "lora_A.weight" and shape[1] == width) or (kind == "lora_B.weight" and shape[0] == out)
        if not fits:
            raise AdapterError(f"{files.label}: {name} has shape {tuple(shape)}, which {bundle}'s {module} "
                               f"({width} in, {out} out) cannot take (adapter made for another base)",
                               hint="use an adapter trained on the bundle's base model")


def add_runtime_adapter(bundle: Path, plan: Any, text: str, output: Path, force: bool, progress: Progress) -> Manifest:
    manifest = verify_bundle(bundle, check_hashes=True)
    inputs = lora_inputs(onnx.load(str(bundle / manifest.model_file), load_external_data=False).graph)
    if not inputs:
        raise ConfigError(f"{bundle}: the bundle has no runtime adapter inputs (its adapters, if any, were merged)",
                          hint="rebuild it with --adapter-mode runtime, then add adapters to it")
    spec = AdapterSpec(**{**parse_adapter(text), "mode": "runtime"})
    spec = spec.model_copy(update={"path": str(Path(spec.path).expanduser().resolve())})
    if spec.adapter_name in {a.name for a in manifest.runtime_adapters}:
        raise ConfigError(f"--add-adapter: {bundle} already has an adapter named {spec.adapter_name!r}",
                          hint="name the new one with --add-adapter PATH@NAME")
    files = read_adapter(spec)
    check_fits(bundle, files, inputs)
    Workspace(output, force=force).check_output()
    dtype = "float16" if next(iter(inputs.values()))[2] == onnx.TensorProto.FLOAT16 else "float32"
    with Workspace(output, force=force) as workspace:
        state = BuildState(plan=plan, work_dir=workspace.work_dir, bundle_dir=workspace.bundle_dir)
        _load_base(state, progress)
        adapter = read_runtime_adapter(files, state.model)
        shutil.copytree(bundle, workspace.bundle_dir, dirs_exist_ok=True)
        entry = write_adapter(workspace.bundle_dir, adapter, dtype)
        entries, _ = prove(workspace.bundle_dir, manifest, [adapter], [entry], state.model, state.tokenizer, None,
                           plan, _provider(manifest), progress, STAGE)
        plan_data = dict(manifest.plan)
        plan_data["adapters"] = [*plan_data.get("adapters", []), {**spec.model_dump(), "sha256": files.sha256}]
        updated = dataclasses.replace(manifest, runtime_adapters=(*manifest.runtime_adapters, *entries), plan=plan_data,
                                      files=describe_files(workspace.bundle_dir))
        write_manifest(workspace.bundle_dir, updated)
        workspace.publish()
    return updated


def _load_base(state: BuildState, progress: Progress) -> None:
    """The source model (sha256 checked by the plan) with the bundle's merged adapters merged again."""
    from edgelm.stages.export.decoder import PARITY_TEXT
    from edgelm.stages.load.model import LoadModel

    progress(STAGE, 0, None, "loading the source model")
    LoadModel().run(state, progress)
    merged = [a for a in state.plan.adapters if a.mode == "merge"]
    if merged:
        probe = [state.tokenizer(PARITY_TEXT)["input_ids"][:32]]
        state.model, _ = merge_adapters(state.model, read_adapters(merged), probe)


def _provider(manifest: Manifest) -> str:
    import onnxruntime

    return manifest.provider if manifest.provider in onnxruntime.get_available_providers() else "CPUExecutionProvider"
