"""Encoder builds: quantize by the profile's encoder scheme, then lay the bundle out (model.onnx +
model.onnx.data, tokenizer.json and the manifest's `encoder` section, which says what the graph
computes: task, inputs, output, pooling, normalisation, labels, max_length). The manifest stage
then writes manifest.json once, as for decoders (edgelm/stages/package.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgelm.pipeline.encoder_results import EncoderExportResult, EncoderQuantizeResult
from edgelm.pipeline.results import PackageResult
from edgelm.pipeline.stage import BuildState, Progress
from edgelm_runtime.bundle import MODEL_FILE, TOKENIZER_FILE, EncoderLayout, Manifest, describe_files

CALIBRATION_TEXTS = 64  # static-int8: calibration prompts, 8 padded batches of 8


def encoder_layout(state: BuildState, static: bool = True) -> EncoderLayout:
    """The manifest's `encoder` section; static=False for the dynamic fp32 reference graph."""
    from edgelm.arch import encoder_for_config

    inputs, export = state.encoder, state.result(EncoderExportResult)
    hidden = encoder_for_config(state.model.config).sizes(state.model.config)[0]
    pad = state.tokenizer.pad_token_id
    return EncoderLayout(task=inputs.task, inputs=tuple(export.inputs), output=export.output, hidden_size=hidden,
                         max_length=state.max_seq_len, pad_token_id=int(pad) if pad is not None else 0,
                         pooling=inputs.pooling.mode if inputs.task == "feature-extraction" else None,
                         normalize=inputs.pooling.normalize if inputs.task == "feature-extraction" else False,
                         labels=inputs.labels, multi_label=getattr(state.model.config, "problem_type", None)
                         == "multi_label_classification", static_seq_len=state.max_seq_len if static and state.plan.profile.encoder.static_seq_len else None)


def assemble_encoder_bundle(dest: Path, onnx_path: Path, state: BuildState, name: str, profile: str, provider: str,
                            session_options: dict[str, Any], static: bool = True) -> Manifest:
    """Write the graph and the tokenizer into `dest`; the manifest is returned, not written."""
    from edgelm.stages.package import save_model

    dest.mkdir(parents=True, exist_ok=True)
    save_model(onnx_path, dest)
    state.tokenizer.backend_tokenizer.save(str(dest / TOKENIZER_FILE))
    return Manifest(name=name, profile=profile, provider=provider, model_file=MODEL_FILE, tokenizer_file=TOKENIZER_FILE,
                    kv=None, encoder=encoder_layout(state, static), max_seq_len=state.max_seq_len,
                    vocab_size=int(state.model.config.vocab_size), eos_token_ids=(),
                    session_options=session_options, files=describe_files(dest))


class QuantizeEncoder:
    name = EncoderQuantizeResult.stage
    title = "Quantize encoder (the profile's encoder scheme)"

    def run(self, state: BuildState, progress: Progress) -> EncoderQuantizeResult:
        from edgelm.calibration import calibration_texts
        from edgelm.quant.encoder import TextFeeds, quantize_encoder

        scheme = state.plan.profile.encoder.quantization
        if scheme == "none" and state.plan.profile.encoder.embeddings == "float":
            return EncoderQuantizeResult(scheme="none", skipped="fp32: no quantization")
        calibration = None
        if scheme in ("static-int8", "qnn-qdq"):
            texts = calibration_texts(state.plan.calibration.source, state.tokenizer, None,
                                      max(state.plan.calibration.samples, CALIBRATION_TEXTS))
            calibration = TextFeeds(texts, state.tokenizer, state.result(EncoderExportResult).inputs, state.max_seq_len,
                                    static=state.plan.profile.encoder.static_seq_len is not None)
        progress(self.name, 0, None, scheme)
        target = state.work_dir / "quantized" / MODEL_FILE
        facts = quantize_encoder(scheme, state.current_onnx, target, calibration, state.plan.profile.encoder.embeddings)
        state.current_onnx = target
        return EncoderQuantizeResult(**facts)


class PackageEncoder:
    name = "package"
    title = "Package bundle (model, tokenizer, manifest)"

    def run(self, state: BuildState, progress: Progress) -> PackageResult:
        from edgelm.stages.package import session_options

        profile = state.plan.profile
        manifest = assemble_encoder_bundle(state.bundle_dir, state.current_onnx, state, state.plan.name, profile.name,
                                           profile.provider, session_options(state))
        size = sum(p.stat().st_size for p in state.bundle_dir.rglob("*") if p.is_file())
        return PackageResult(size_mb=round(size / 1e6, 1), files=sorted([p.name for p in state.bundle_dir.iterdir()]
                                                                        + ["manifest.json"]), manifest=manifest)
