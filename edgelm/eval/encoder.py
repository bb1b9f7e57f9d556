"""`edgelm eval` for encoder bundles: the bundle against its fp32 model, through edgelm-runtime.

The reference is another bundle folder, or by default the bundle's own source model (with its
recorded adapters merged again) exported in fp32 into a temporary folder by the build's own
stages, so the numbers are exactly the build's quality check, rerun on demand and on another
machine: cosine and retrieval for embeddings, label agreement (and accuracy on labelled data) for
classifiers, entity F1 for token classifiers."""

from __future__ import annotations

import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from edgelm.pipeline.stage import BuildState, Progress, no_progress
from edgelm_runtime.bundle import MANIFEST_FILE, Manifest


def fp32_reference(manifest: Manifest, model: str | None, work: Path, progress: Progress) -> Any:
    """The bundle's source (or `model`), adapters merged, exported in fp32 and opened as a bundle."""
    import edgelm_runtime
    from edgelm.config._yaml import validate
    from edgelm.config.plan import BuildPlan
    from edgelm.config.profile import load_profile
    from edgelm.pipeline.runner import run_stages
    from edgelm.stages.adapt import MergeAdapters
    from edgelm.stages.encoder.export import ExportEncoder
    from edgelm.stages.encoder.load import EncoderPreflight, LoadEncoder
    from edgelm.stages.encoder.package import assemble_encoder_bundle

    data = {**manifest.plan, "profile": load_profile("cpu-fp32").model_dump(), "task": manifest.encoder.task}
    if model is not None:
        data |= {"model": model, "adapters": []}
    plan = validate(data, BuildPlan, f"{manifest.name}/{MANIFEST_FILE} plan", "build")
    state = BuildState(plan=plan, work_dir=work, bundle_dir=work / "bundle")
    run_stages((EncoderPreflight(), LoadEncoder(), MergeAdapters(), ExportEncoder()), state, progress)
    folder = work / "reference"
    built = assemble_encoder_bundle(folder, state.reference_onnx, state, f"{manifest.name}-fp32-reference", "reference",
                                    "CPUExecutionProvider", {}, static=False)
    return edgelm_runtime.load_bundle(folder, manifest=built)


def evaluate_encoder(bundle: str | Path, reference: str | None = None, eval_text: str = "builtin",
                     provider: str | None = None, progress: Progress = no_progress) -> tuple[dict[str, Any], list[str]]:
    """(result, gate failures): the --json schema, and the bundle's own encoder gates it misses."""
    import edgelm_runtime
    from edgelm.stages.encoder.load import read_labelled
    from edgelm.stages.encoder.quality import GATES, compare_encoders, encoder_gate_failures, held_out_texts
    from edgelm_runtime.hardware import host_features

    candidate = edgelm_runtime.load_bundle(bundle, provider=provider)
    manifest = candidate.manifest
    task = manifest.encoder.task
    quality = manifest.plan.get("quality", {})
    with tempfile.TemporaryDirectory(prefix="edgelm-eval-") as work:
        if reference is not None and (Path(reference) / MANIFEST_FILE).is_file():
            ref, described = edgelm_runtime.load_bundle(reference), str(reference)
        else:
            ref = fp32_reference(manifest, reference, Path(work), progress)
            described = f"{reference or manifest.provenance.get('source', {}).get('path', 'source')} (fp32, exported now)"
        texts = held_out_texts(task, eval_text)
        labelled_path = quality.get("labelled_data")
        labelled = read_labelled(Path(labelled_path), manifest.encoder.labels) if labelled_path else []
        progress("eval", 0, None, f"{task}: bundle vs fp32")
        metrics = compare_encoders(candidate, ref, texts, labelled)
    host = host_features()
    result = {"bundle": str(bundle), "reference": described, "eval_text": eval_text, **metrics,
              "host": {"cpu": host.get("cpu"), "machine": host.get("machine")}}
    gates = SimpleNamespace(**{gate: quality.get(gate) for gate in GATES})
    return result, encoder_gate_failures(metrics, gates)
