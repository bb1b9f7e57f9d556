"""Static QDQ (StaticQDQ) as one scheme: activation stats and SmoothQuant before export, per-group
sensitivity for mixed precision, then QDQ calibrated on real prompts — on weight MatMuls (CPUs) or
on every op with the QNN rules (NPUs, static graphs). It computes in int8 wherever it runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgelm.config.profile import StaticQDQ
from edgelm.quant.base import INT8_DOT_PRODUCT, STAGE, Scheme


def quantize(state: Any, settings: StaticQDQ, progress: Any) -> dict[str, Any]:
    """QDQ on the weight MatMuls' inputs (a constant second input), per channel, or every op.

    Quantizing every MatMul (attention scores, softmax output) or graph outputs costs SmolLM2 a 4.4x
    perplexity ratio against 1.8x for weight MatMuls alone (measured here). onnxruntime fuses the
    weight QDQ MatMuls into MatMulIntegerToFloat at load time. Calibration streams: feeds are made
    one at a time, and MinMax keeps only per-tensor ReduceMin/ReduceMax scalars per feed."""
    if settings.ops == "all":
        return _every_op(state, settings, progress)
    import contextlib
    import io

    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from edgelm.errors import StageError
    from edgelm.quant.graph import size_mb, weight_matmuls
    from edgelm.calibration import CalibrationFeeds, calibration_token_ids
    from edgelm.stages.export.decoder import kv_shape

    source = state.current_onnx
    graph = onnx.load(str(source), load_external_data=False)
    candidates = weight_matmuls(graph)
    nodes = [n for n, module in candidates.items() if not any(pattern in module for pattern in settings.keep_float)]
    if not nodes:
        raise StageError(STAGE, "no weight MatMul left to quantize", hint="check quantization.keep_float in the profile")

    calibration = state.plan.calibration
    limit = min(calibration.max_prompt_tokens, state.max_seq_len - calibration.decode_steps - 1)
    token_ids = calibration_token_ids(calibration.source, state.tokenizer, state.chat_template, calibration.samples, limit)
    if not token_ids:
        raise StageError(STAGE, "calibration produced no tokens", hint="check the calibration file's contents")
    total = len(token_ids) * (calibration.decode_steps + 1)
    feeds = CalibrationFeeds(state.reference_onnx, token_ids, kv_shape(state.model.config), calibration.decode_steps,
                             on_feed=lambda n: progress(STAGE, n, total, f"calibrating {n}/{total}"))
    target = state.work_dir / "quantized" / "model.onnx"
    target.parent.mkdir(parents=True, exist_ok=True)
    # Histogram methods (entropy, percentile) keep every activation of one collect call in memory
    # (onnxruntime#10503: 256 GB) and stack them into one array (so prefill and decode shapes cannot
    # share a call): collect one feed at a time; the histograms merge. MinMax reduces each feed to
    # two scalars in the graph, so it streams as it is.
    streaming = {} if settings.calibration_method == "minmax" else {"CalibStridedMinMax": 1}
    with contextlib.redirect_stdout(io.StringIO()):  # the histogram collector prints per chunk
        quantize_static(
            str(source), str(target), feeds, quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["MatMul"], nodes_to_quantize=nodes, per_channel=settings.per_channel, reduce_range=settings.reduce_range,
            activation_type=QuantType.QUInt8 if settings.activation_dtype == "uint8" else QuantType.QUInt16,
            weight_type=QuantType.QInt8 if settings.weight_dtype == "int8" else QuantType.QUInt8,
            calibrate_method={"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                              "percentile": CalibrationMethod.Percentile}[settings.calibration_method],
            use_external_data_format=True,
            # Shape inference stops at contrib ops (SkipSimplifiedLayerNormalization): tell the
            # quantizer that untyped tensors are float. Not CalibMaxIntermediateOutputs: in
            # onnxruntime 1.31 it discards each full batch of ranges instead of merging it.
            # Only MatMul *inputs* get QDQ: by default the QDQ quantizer also quantizes MatMul outputs,
            # i.e. the residual stream after the attention output and MLP down projections (measured:
            # ratio 3.27 with, see docs/fidelity.md).
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT, "OpTypesToExcludeOutputQuantization": ["MatMul"],
                           **streaming},
        )
    facts: dict[str, Any] = {}
    if settings.mixed_precision == "auto":
        restored, facts["mixed_precision"], target = _search(state, source, target, {n: candidates[n] for n in nodes}, progress)
        nodes = [n for n in nodes if n not in restored]
    quantized = onnx.load(str(target), load_external_data=False)
    if not any(n.op_type == "DequantizeLinear" for n in quantized.graph.node):
        raise StageError(STAGE, "the quantized graph has no DequantizeLinear node", hint="report this with --debug")
    state.current_onnx = target
    return {"mode": settings.mode, "quantized_matmuls": len(nodes), "kept_float": len(candidates) - len(nodes),
            "calibration_feeds": feeds.count, "calibration_samples": len(token_ids),
            "calibration_source": state.plan.calibration.source,
            "size_mb_before": size_mb(source), "size_mb_after": size_mb(target), **facts}


def _every_op(state: Any, settings: StaticQDQ, progress: Any) -> dict[str, Any]:
    """QDQ on every op of both static graphs with onnxruntime's QNN rules (get_qnn_qdq_config:
    16-bit activations, fixed output scales for Sigmoid, per-tensor MatMul weights, per-channel
    Conv weights), each graph calibrated on the feeds it will get: prefill chunks or decode steps."""
    import dataclasses

    import onnx
    from onnxruntime.quantization import QuantType, quantize as ort_quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    from edgelm.errors import StageError
    from edgelm.quant.graph import quiet_root_logger, size_mb
    from edgelm.calibration import StaticCalibrationFeeds, calibration_token_ids
    from edgelm.stages.export.decoder import kv_shape

    graphs, calibration = state.static_graphs, state.plan.calibration
    steps = min(calibration.decode_steps, graphs.layout.kv_window // 2)
    limit = min(calibration.max_prompt_tokens, graphs.layout.kv_window - steps)
    token_ids = calibration_token_ids(calibration.source, state.tokenizer, state.chat_template, calibration.samples, limit)
    if not token_ids:
        raise StageError(STAGE, "calibration produced no tokens", hint="check the calibration file's contents")
    quantized, feeds_seen = {}, {}
    for kind, source in (("prefill", graphs.prefill), ("decode", graphs.decode)):
        feeds = StaticCalibrationFeeds(graphs, token_ids, kv_shape(state.model.config), steps, kind,
                                       on_feed=lambda n, kind=kind: progress(STAGE, n, None, f"calibrating {kind}: feed {n}"))
        config = get_qnn_qdq_config(
            str(source), feeds, per_channel=settings.per_channel,
            activation_type=QuantType.QUInt16 if settings.activation_dtype == "uint16" else QuantType.QUInt8,
            weight_type=QuantType.QInt8 if settings.weight_dtype == "int8" else QuantType.QUInt8)
        target = state.work_dir / "quantized" / kind / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        with quiet_root_logger():  # onnxruntime logs advice ("consider pre-processing") on the root logger
            ort_quantize(str(source), str(target), config)
        quantized[kind], feeds_seen[kind] = target, feeds.count
    state.static_graphs = dataclasses.replace(graphs, prefill=quantized["prefill"], decode=quantized["decode"])
    state.current_onnx = quantized["prefill"]
    counts = {kind: sum(1 for n in onnx.load(str(path), load_external_data=False).graph.node
                        if n.op_type == "DequantizeLinear") for kind, path in quantized.items()}
    if not all(counts.values()):
        raise StageError(STAGE, "a quantized graph has no DequantizeLinear node", hint="report this with --debug")
    return {"mode": settings.mode, "ops": settings.ops, "activation_dtype": settings.activation_dtype,
            "weight_dtype": settings.weight_dtype, "per_channel": settings.per_channel,
            "dequantize_nodes": counts, "calibration_feeds": feeds_seen, "calibration_samples": len(token_ids),
            "calibration_source": calibration.source,
            "size_mb_before": size_mb(graphs.prefill), "size_mb_after": size_mb(quantized["prefill"])}


def _search(state: Any, float_path: Path, target: Path, candidates: dict[str, str],
            progress: Any) -> tuple[set[str], dict[str, Any], Path]:
    """mixed_precision: auto. Restore the fewest ranked MatMul groups to fp32 that pass the plan's
    gates; returns the restored node names, the search facts and the chosen graph's path."""
    import onnx

    from edgelm.errors import StageError
    from edgelm.eval.text import eval_windows
    from edgelm.onnx_graph import save_external
    from edgelm.stages.export.decoder import kv_shape, session_logits
    from edgelm.eval.metrics import gate_failures
    from edgelm.quant.mixed_precision import WindowMetrics, ranked_groups, restore_float, search_prefix

    quality = state.plan.quality
    if all(g is None for g in (quality.max_perplexity_ratio, quality.min_top1_agreement, quality.max_kl_divergence)):
        raise StageError(STAGE, "mixed_precision: auto needs a quality gate to aim for",
                         hint="set quality.max_perplexity_ratio (or --accuracy-budget), or mixed_precision: off")
    quantized = onnx.load(str(target), load_external_data=True)
    float_weights = {i.name: i for i in onnx.load(str(float_path), load_external_data=True).graph.initializer}
    from edgelm.pipeline.results import SensitivityResult, SmoothResult

    sensitivity, smooth = state.result(SensitivityResult), state.result(SmoothResult)
    groups = ranked_groups(candidates, (sensitivity.by_module if sensitivity else {}) or smooth.outlier_ratios)
    windows = eval_windows(quality.eval_text, quality.windows, quality.window_len,
                           lambda text: state.tokenizer(text, add_special_tokens=False)["input_ids"])
    kv = kv_shape(state.model.config)
    metrics = WindowMetrics(session_logits(str(state.reference_onnx), kv), windows)
    trials: list[dict[str, Any]] = []

    def passes(k: int) -> bool:
        progress(STAGE, len(trials), None, f"mixed precision: trying {k} of {len(groups)} groups in fp32")
        keep = {n for group in groups[:k] for n in group}
        trial = restore_float(quantized, float_weights, keep) if keep else quantized
        result = metrics.measure(session_logits(trial.SerializeToString(), kv))
        trials.append({"fp32_groups": k, "fp32_matmuls": len(keep), **{m: round(v, 4) for m, v in result.items()}})
        return not gate_failures(result, quality)

    k = search_prefix(passes, len(groups))
    if k is None or k == len(groups):
        best = max(trials[:-1] or trials, key=lambda t: t["top1_agreement"])
        raise StageError(STAGE, f"only keeping every weight MatMul in fp32 meets the gates (best partial: {best})",
                         hint="relax quality.* (or --accuracy-budget), or build with --profile cpu-fp32")
    keep = {n for group in groups[:k] for n in group}
    if keep:
        target = state.work_dir / "mixed" / "model.onnx"
        save_external(restore_float(quantized, float_weights, keep), target)
    modules = sorted(candidates[n] for n in keep)
    return keep, {"trials": trials, "fp32_groups": k, "fp32_modules": modules}, target


def label(profile: Any) -> str:
    q = profile.quantization
    bits = f"W8A{16 if q.activation_dtype == 'uint16' else 8}"
    scope = "every op" if q.ops == "all" else "weight MatMuls"
    static = ", static shapes" if profile.export.static_shapes else ""
    rotated = ", Hadamard-rotated" if q.rotation != "none" else ""
    return f"{bits} static QDQ on {scope} ({q.weight_dtype} weights, {q.activation_dtype} activations){static}{rotated}"


def note(facts: dict[str, Any]) -> str:
    if facts.get("ops") == "all":
        feeds = facts["calibration_feeds"]
        return (f"QDQ on every op ({facts['activation_dtype']} activations, {facts['weight_dtype']} weights"
                f"{' per channel' if facts['per_channel'] else ''}), {feeds['prefill']} prefill + "
                f"{feeds['decode']} decode calibration feeds, {facts['size_mb_before']} -> {facts['size_mb_after']} MB")
    text = (f"{facts['quantized_matmuls']} MatMuls, {facts['calibration_feeds']} calibration feeds, "
            f"{facts['size_mb_before']} -> {facts['size_mb_after']} MB")
    search = facts.get("mixed_precision")
    if search:
        text += f"; auto: {facts['kept_float']} fp32 after {len(search['trials'])} trials"
    return text


def export_refusal(export: Any, settings: StaticQDQ) -> str | None:
    """Static graphs are quantized on every op with minmax; the dynamic graph only on weight MatMuls."""
    if export.static_shapes and settings.ops != "all":
        return "quantization.ops: static graphs are quantized on every op (ops: all)"
    if export.static_shapes and settings.calibration_method != "minmax":
        return "quantization.calibration_method: ops: all calibrates with minmax only (histograms of every tensor are not streamed yet)"
    if not export.static_shapes and settings.ops == "all":
        return ("quantization.ops: all needs export.static_shapes: true (the dynamic graph's fused attention has "
                "no QDQ form)")
    return None


SCHEME = Scheme(
    mode="static-qdq", quantize=quantize, label=label, note=note, export_refusal=export_refusal,
    needs=lambda settings: frozenset({INT8_DOT_PRODUCT}),
    # Smooth always runs: its activation stats rank MatMuls for mixed precision and its ranges feed
    # the sensitivity probe; it smooths only when smoothquant_alpha is set.
    prep={"rotate": lambda settings: settings.rotation != "none", "smooth": lambda settings: True, "sensitivity": lambda settings: settings.mixed_precision == "auto"},
)
