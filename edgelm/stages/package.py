"""Package the bundle: model.onnx (+ model.onnx.data), tokenizer.json, chat template, and at the
very end manifest.json (the names are the runtime's: edgelm_runtime.bundle).

The Package stage writes the files and assembles the runtime's part of the Manifest in memory;
the quality check opens the bundle with it through edgelm_runtime; the WriteManifest stage, last,
adds the plan, adapters, pruning, fusions, quality and provenance from the typed stage results
and writes manifest.json once. The manifest uses the runtime's own classes, so what the compiler
writes is exactly what the runtime reads. The package result (kept in the manifest) splits
model.onnx's weights into embedding, layers and head MB (graph_roles.size_split): with a large
vocabulary the embedding and head can outweigh the layers, which the profile's `embeddings` and
`lm_head` fields trade."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import platform
from pathlib import Path
from typing import Any

import onnx

from edgelm.pipeline.results import (AdapterFilesResult, AdaptersResult, FuseResult, ManifestResult, PackageResult, PruneResult,
                                     QualityResult)
from edgelm.pipeline.stage import BuildState, Progress
from edgelm.stages.export.decoder import kv_shape
from edgelm.graph_roles import size_split
from edgelm.onnx_graph import save_external
from edgelm_runtime.bundle import (CHAT_TEMPLATE_FILE, MANIFEST_FILE, MODEL_FILE, PROMPTS_FILE, TOKENIZER_FILE,
                                   GenerationDefaults, KVLayout, Manifest, ModelIO, describe_files, write_manifest)
from edgelm_runtime.prompts import write_prompts

_VERSIONED = ("edgelm", "edgelm-runtime", "torch", "transformers", "peft", "onnx", "onnxscript", "onnxruntime")


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def eos_token_ids(state: BuildState) -> tuple[int, ...]:
    ids = [state.tokenizer.eos_token_id]
    generation = getattr(state.model, "generation_config", None)
    configured = getattr(generation, "eos_token_id", None)
    ids += configured if isinstance(configured, list) else [configured]
    return tuple(sorted({int(i) for i in ids if i is not None}))


def save_model(onnx_path: Path, dest: Path) -> None:
    """Copy an ONNX model with its weights into one external data file beside it."""
    if onnx_path.parent.resolve() == dest.resolve() and onnx_path.name == MODEL_FILE:
        return
    save_external(onnx.load(str(onnx_path), load_external_data=True), dest / MODEL_FILE)


def save_static_graphs(prefill: Path, decode: Path, dest: Path, decode_file: str) -> int:
    """The prefill graph as model.onnx (+ .data) and the decode graph beside it, whose weights that
    equal the prefill graph's point into model.onnx.data instead of a copy: both graphs are made
    from the same weights, quantized alike, so on SmolLM2 every weight is stored once. Returns the
    number of shared tensors."""
    from onnx import external_data_helper, numpy_helper

    first = onnx.load(str(prefill), load_external_data=True)
    raw = {init.name: numpy_helper.to_array(init).tobytes() for init in first.graph.initializer}
    save_external(first, dest / MODEL_FILE)
    stored = {init.name: init for init in first.graph.initializer
              if external_data_helper.uses_external_data(init)}  # save_model moved these into the .data file
    second = onnx.load(str(decode), load_external_data=True)
    shared = 0
    for init in second.graph.initializer:
        twin = stored.get(init.name)
        if twin is not None and twin.data_type == init.data_type and raw[init.name] == numpy_helper.to_array(init).tobytes():
            init.ClearField("raw_data")
            for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                init.ClearField(field)
            init.data_location = onnx.TensorProto.EXTERNAL
            del init.external_data[:]
            init.external_data.extend(twin.external_data)
            shared += 1
    save_external(second, dest / decode_file)
    return shared


def assemble_bundle(dest: Path, onnx_path: Path, state: BuildState, name: str, profile: str, provider: str,
                    session_options: dict[str, Any], provenance: dict[str, Any], static: Any = None,
                    provider_options: dict[str, dict[str, Any]] | None = None, write: bool = True) -> Manifest:
    """`static`: StaticGraphs (prefill + decode) instead of the one graph at `onnx_path`.
    `provider_options`: {provider: {option: value}} the runtime hands onnxruntime with that provider.
    write=False leaves manifest.json unwritten (the build writes it once, when everything is known)."""
    dest.mkdir(parents=True, exist_ok=True)
    if static is not None:
        save_static_graphs(static.prefill, static.decode, dest, static.layout.decode_model_file)
        onnx_path = static.prefill
    else:
        save_model(onnx_path, dest)
    state.tokenizer.backend_tokenizer.save(str(dest / TOKENIZER_FILE))
    if state.chat_template:
        (dest / CHAT_TEMPLATE_FILE).parent.mkdir(parents=True, exist_ok=True)
        (dest / CHAT_TEMPLATE_FILE).write_text(state.chat_template, encoding="utf-8")
    prompts = {name: spec.to_runtime(name) for name, spec in state.plan.templates.items()}
    if prompts:
        write_prompts(dest / PROMPTS_FILE, prompts)
    num_layers, kv_heads, head_dim = kv_shape(state.model.config)
    manifest = Manifest(
        name=name, profile=profile, provider=provider, model_file=MODEL_FILE, tokenizer_file=TOKENIZER_FILE,
        chat_template_file=CHAT_TEMPLATE_FILE if state.chat_template else None,
        prompt_templates_file=PROMPTS_FILE if prompts else None,
        kv=KVLayout(num_layers=num_layers, num_kv_heads=kv_heads, head_dim=head_dim, dtype=kv_dtype(onnx_path),
                    share_buffer=attention_shares_kv(onnx_path)),
        io=ModelIO() if static is not None else (state.graph_io or ModelIO()),
        static=static.layout if static is not None else None,
        max_seq_len=static.layout.kv_window if static is not None else state.max_seq_len,
        vocab_size=int(state.model.config.vocab_size),
        eos_token_ids=eos_token_ids(state), bos_token=state.tokenizer.bos_token, eos_token=state.tokenizer.eos_token,
        session_options=session_options, provider_options=dict(provider_options or {}), provenance=provenance,
        generation=GenerationDefaults(prompt_lookup=0 if static is not None else
                                      state.plan.profile.generation.prompt_lookup),
        files=describe_files(dest))
    if write:
        write_manifest(dest, manifest)
    return manifest


def kv_dtype(onnx_path: Path) -> str:
    """The element type of the graph's past KV inputs (float16 after the float16 conversion)."""
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    past = next((v for v in graph.input if ModelIO().is_past(v.name)), None)
    if past is None:
        return "float32"
    return onnx.helper.tensor_dtype_to_np_dtype(past.type.tensor_type.elem_type).name


def attention_shares_kv(onnx_path: Path) -> bool:
    """Every attention is GroupQueryAttention, which can take one buffer as past and present."""
    ops = {node.op_type for node in onnx.load(str(onnx_path), load_external_data=False).graph.node}
    return "GroupQueryAttention" in ops and "MultiHeadAttention" not in ops


def compressed_size(folder: Path) -> int:
    """Bytes of every file in `folder` after zlib (level 6, gzip's default), streamed."""
    import zlib

    total = 0
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        packer = zlib.compressobj(6)
        with open(path, "rb") as handle:
            while block := handle.read(1 << 22):
                total += len(packer.compress(block))
        total += len(packer.flush())
    return total


def session_options(state: BuildState) -> dict[str, Any]:
    return state.plan.profile.session.model_dump()


class Package:
    name = "package"
    title = "Package bundle (model, tokenizer, templates, manifest)"

    def run(self, state: BuildState, progress: Progress) -> PackageResult:
        profile = state.plan.profile
        manifest = assemble_bundle(state.bundle_dir, state.current_onnx, state, state.plan.name, profile.name,
                                   profile.provider, session_options(state), provenance={}, static=state.static_graphs,
                                   write=False)
        size = sum(p.stat().st_size for p in state.bundle_dir.rglob("*") if p.is_file())
        # zeros (unstructured, 2:4) shrink a bundle only once compressed
        compressed = round(compressed_size(state.bundle_dir) / 1e6, 1) if state.plan.prune is not None else None
        return PackageResult(size_mb=round(size / 1e6, 1), files=sorted([p.name for p in state.bundle_dir.iterdir()] + [MANIFEST_FILE]),
                             size_split=size_split(onnx.load(str(state.bundle_dir / MODEL_FILE), load_external_data=False)),
                             compressed_mb=compressed, manifest=manifest)


def pruning_record(prune: PruneResult | None, package: PackageResult, quality: QualityResult | None) -> dict[str, Any]:
    """The manifest's `pruning`: what the prune stage did, the bundle's size (plain and compressed)
    and the finished bundle's perplexity against the *unpruned* fp32 model (the quality check
    compares with the pruned one)."""
    if prune is None or prune.skipped:
        return {}
    record = {**prune.record(), "bundle_mb": package.size_mb, "compressed_mb": package.compressed_mb}
    if quality is not None and quality.perplexity and prune.perplexity_before:
        record["bundle_perplexity_ratio_vs_unpruned"] = round(quality.perplexity / prune.perplexity_before, 4)
    return record


class WriteManifest:
    """The build's last stage: the manifest, assembled once from the typed results, written once."""

    name = "manifest"
    title = "Write manifest.json (plan, provenance, quality, sha256 of every file)"

    def run(self, state: BuildState, progress: Progress) -> ManifestResult:
        from edgelm.pipeline.encoder_results import EncoderQualityResult

        package, adapters = state.result(PackageResult), state.result(AdaptersResult)
        quality = state.result(QualityResult) or state.result(EncoderQualityResult)
        fuse = state.result(FuseResult)
        provenance = {"source": state.source, "versions": versions(), "build_host": state.build_host,
                      "stages": {name: {"seconds": state.seconds.get(name), **record}
                                 for name, record in state.facts.items()}}
        runtime = state.result(AdapterFilesResult)
        extra = {"runtime_adapters": runtime.entries, "files": describe_files(state.bundle_dir)} \
            if runtime is not None and runtime.entries else {}  # adapters/ was written after the package stage
        manifest = dataclasses.replace(
            package.manifest, quality=quality.record() if quality else {}, plan=state.plan.summary(), **extra,
            adapters=list(adapters.merged) if adapters else [],
            pruning=pruning_record(state.result(PruneResult), package, state.result(QualityResult)),
            fusions=dict(fuse.fused) if fuse else {}, provenance=provenance)
        write_manifest(state.bundle_dir, manifest)
        return ManifestResult(files=len(manifest.files), format_version=manifest.format_version, manifest=manifest)
