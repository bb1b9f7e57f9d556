"""Quantization as the profile says: static int8 QDQ calibrated on real prompts, or weight-only
block quantization (MatMulNBits, see weight_only.py).

Only weight MatMuls (a constant second input) are quantized, per-channel: quantizing every
MatMul (attention scores, softmax output) or graph outputs costs SmolLM2 a 4.4x perplexity ratio
against 1.8x for weight MatMuls alone (measured here). onnxruntime fuses the weight QDQ MatMuls
into MatMulIntegerToFloat at load time. Calibration streams: feeds are made one at a time, and
MinMax keeps only per-tensor ReduceMin/ReduceMax scalars per feed, so memory stays flat."""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Any

import onnx

from edgelm.config.profile import StaticQDQ, WeightOnly, Float16
from edgelm.errors import StageError
from edgelm.pipeline.stage import BuildState, Progress
from edgelm.stages.calibration import CalibrationFeeds, StaticCalibrationFeeds, calibration_token_ids
from edgelm.eval.text import eval_windows
from edgelm.stages.export import kv_shape, session_logits
from edgelm.stages.mixed_precision import WindowMetrics, gate_failures, ranked_groups, restore_float, search_prefix
from edgelm.stages.weight_only import quantize_weight_only, select_matmuls

logger = logging.getLogger(__name__)


def weight_matmuls(model: onnx.ModelProto) -> dict[str, str]:
    """{node name: module path} of MatMuls with a constant weight, e.g. "layers.3.mlp.<projection>"."""
    initializers = {init.name for init in model.graph.initializer}
    return {n.name: module_path(n) for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in initializers}


def module_path(node: onnx.NodeProto) -> str:
    """The PyTorch module a node came from, read from the dynamo exporter's "namespace" metadata."""
    namespace = next((p.value for p in node.metadata_props if p.key == "namespace"), "")
    modules = [part.split(":")[0].strip() for part in namespace.split("/") if "torch.nn.modules" in part]
    if not modules:
        return node.name
    path = modules[-1]  # the export wrapper's and the HF model's prefixes, then "layers.3.mlp.<projection>"
    return path[path.index("layers."):] if "layers." in path else path


@contextlib.contextmanager
def _quiet_root_logger():
    root, guard = logging.getLogger(), logging.NullHandler()
    root.addHandler(guard)
    try:
        yield
    finally:
        root.removeHandler(guard)


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.iterdir() if p.is_file())


def save_external(model: onnx.ModelProto, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=target.name + ".data", size_threshold=1024)


class Quantize:
    name = "quantize"
    title = "Quantize (static int8 QDQ with calibration, or weight-only MatMulNBits)"

    def run(self, state: BuildState, progress: Progress) -> dict[str, Any]:
        settings = state.plan.profile.quantization
        if isinstance(settings, WeightOnly):
            return self._weight_only(state, settings, progress)
        if isinstance(settings, Float16):
            return self._float16(state, settings)
        if not isinstance(settings, StaticQDQ):
            return {"mode": settings.mode}
        if settings.ops == "all":
            return self._every_op(state, settings, progress)
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        source = state.current_onnx
        graph = onnx.load(str(source), load_external_data=False)
        candidates = weight_matmuls(graph)
        nodes = [n for n, module in candidates.items() if not any(pattern in module for pattern in settings.keep_float)]
        if not nodes:
            raise StageError(self.name, "no weight MatMul left to quantize", hint="check quantization.keep_float in the profile")

        calibration = state.plan.calibration
        limit = min(calibration.max_prompt_tokens, state.max_seq_len - calibration.decode_steps - 1)
        token_ids = calibration_token_ids(calibration.source, state.tokenizer, state.chat_template, calibration.samples, limit)
        if not token_ids:
            raise StageError(self.name, "calibration produced no tokens", hint="check the calibration file's contents")
        total = len(token_ids) * (calibration.decode_steps + 1)
        feeds = CalibrationFeeds(state.reference_onnx, token_ids, kv_shape(state.model.config), calibration.decode_steps,
                                 on_feed=lambda n: progress(self.name, n, total, f"calibrating {n}/{total}"))
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
            restored, facts["mixed_precision"], target = self._search(
                state, source, target, {n: candidates[n] for n in nodes}, progress)
            nodes = [n for n in nodes if n not in restored]
        quantized = onnx.load(str(target), load_external_data=False)
        dq = sum(1 for n in quantized.graph.node if n.op_type == "DequantizeLinear")
        if dq == 0:
            raise StageError(self.name, "the quantized graph has no DequantizeLinear node", hint="report this with --debug")
        before, after = folder_size(source), folder_size(target)
        state.current_onnx = target
        return {"mode": settings.mode, "quantized_matmuls": len(nodes), "kept_float": len(candidates) - len(nodes),
                "calibration_feeds": feeds.count, "calibration_samples": len(token_ids),
                "calibration_source": state.plan.calibration.source,
                "size_mb_before": round(before / 1e6, 1), "size_mb_after": round(after / 1e6, 1), **facts}

    def _every_op(self, state: BuildState, settings: StaticQDQ, progress: Progress) -> dict[str, Any]:
        """QDQ on every op of both static graphs with onnxruntime's QNN rules (get_qnn_qdq_config:
        16-bit activations, fixed output scales for Sigmoid, per-tensor MatMul weights, per-channel
        Conv weights), each graph calibrated on the feeds it will get: prefill chunks or decode steps."""
        import dataclasses

        from onnxruntime.quantization import QuantType, quantize
        from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

        graphs, calibration = state.static_graphs, state.plan.calibration
        steps = min(calibration.decode_steps, graphs.layout.kv_window // 2)
        limit = min(calibration.max_prompt_tokens, graphs.layout.kv_window - steps)
        token_ids = calibration_token_ids(calibration.source, state.tokenizer, state.chat_template, calibration.samples, limit)
        if not token_ids:
            raise StageError(self.name, "calibration produced no tokens", hint="check the calibration file's contents")
        quantized, feeds_seen = {}, {}
        for kind, source in (("prefill", graphs.prefill), ("decode", graphs.decode)):
            feeds = StaticCalibrationFeeds(graphs, token_ids, kv_shape(state.model.config), steps, kind,
                                           on_feed=lambda n, kind=kind: progress(self.name, n, None, f"calibrating {kind}: feed {n}"))
            config = get_qnn_qdq_config(
                str(source), feeds, per_channel=settings.per_channel,
                activation_type=QuantType.QUInt16 if settings.activation_dtype == "uint16" else QuantType.QUInt8,
                weight_type=QuantType.QInt8 if settings.weight_dtype == "int8" else QuantType.QUInt8)
            target = state.work_dir / "quantized" / kind / source.name
            target.parent.mkdir(parents=True, exist_ok=True)
            with _quiet_root_logger():  # onnxruntime logs advice ("consider pre-processing") on the root logger
                quantize(str(source), str(target), config)
            quantized[kind], feeds_seen[kind] = target, feeds.count
        state.static_graphs = dataclasses.replace(graphs, prefill=quantized["prefill"], decode=quantized["decode"])
        state.current_onnx = quantized["prefill"]
        counts = {kind: sum(1 for n in onnx.load(str(path), load_external_data=False).graph.node
                            if n.op_type == "DequantizeLinear") for kind, path in quantized.items()}
        if not all(counts.values()):
            raise StageError(self.name, "a quantized graph has no DequantizeLinear node", hint="report this with --debug")
        return {"mode": settings.mode, "ops": settings.ops, "activation_dtype": settings.activation_dtype,
                "weight_dtype": settings.weight_dtype, "per_channel": settings.per_channel,
                "dequantize_nodes": counts, "calibration_feeds": feeds_seen, "calibration_samples": len(token_ids),
                "calibration_source": calibration.source,
                "size_mb_before": round(folder_size(graphs.prefill) / 1e6, 1),
                "size_mb_after": round(folder_size(quantized["prefill"]) / 1e6, 1)}

    def _float16(self, state: BuildState, settings: Float16) -> dict[str, Any]:
        """onnxruntime's float16 converter; the past/present KV tensors become fp16 too (on a GPU
        the cache stays on the device in fp16), everything else at the graph's edge keeps its type."""
        from onnxruntime.transformers.float16 import convert_float_to_float16

        source = state.current_onnx
        model = onnx.load(str(source), load_external_data=True)
        edge = [v.name for v in [*model.graph.input, *model.graph.output]
                if not v.name.startswith(("past_key_values.", "present."))]
        converted = convert_float_to_float16(model, keep_io_types=edge, op_block_list=list(settings.keep_fp32_ops),
                                             disable_shape_infer=True)
        target = state.work_dir / "float16" / "model.onnx"
        save_external(converted, target)
        state.current_onnx = target
        kept = sorted({n.op_type for n in converted.graph.node if n.op_type in settings.keep_fp32_ops})
        return {"mode": settings.mode, "fp32_ops": kept, "size_mb_before": round(folder_size(source) / 1e6, 1),
                "size_mb_after": round(folder_size(target) / 1e6, 1)}

    def _weight_only(self, state: BuildState, settings: WeightOnly, progress: Progress) -> dict[str, Any]:
        source = state.current_onnx
        graph = onnx.load(str(source), load_external_data=True)
        chosen, int8, kept, head_quantized = select_matmuls(graph, settings)
        if not chosen:
            raise StageError(self.name, "no weight MatMul left to quantize", hint="check quantization.keep_float in the profile")
        progress(self.name, 0, None, f"{settings.algorithm} {settings.bits}-bit, {len(chosen)} MatMuls")
        quantized = quantize_weight_only(graph, settings, chosen, int8)
        ops = [n.op_type for n in quantized.graph.node]
        if ops.count("MatMulNBits") != len(chosen):
            raise StageError(self.name, f"{ops.count('MatMulNBits')} of {len(chosen)} MatMuls became MatMulNBits",
                             hint="report this with --debug; set quantization.keep_float to skip the failing MatMuls")
        target = state.work_dir / "quantized" / "model.onnx"
        save_external(quantized, target)
        state.current_onnx = target
        return {"mode": settings.mode, "bits": settings.bits, "block_size": settings.block_size,
                "symmetric": settings.symmetric, "algorithm": settings.algorithm, "accuracy_level": settings.accuracy_level,
                "quantized_matmuls": len(chosen), "int8_matmuls": len(int8), "kept_float": len(kept), "lm_head_quantized": head_quantized,
                "quantized_embeddings": ops.count("GatherBlockQuantized"),
                "size_mb_before": round(folder_size(source) / 1e6, 1), "size_mb_after": round(folder_size(target) / 1e6, 1)}

    def _search(self, state: BuildState, float_path: Path, target: Path, candidates: dict[str, str],
                progress: Progress) -> tuple[set[str], dict[str, Any], Path]:
        """Restore the fewest ranked MatMul groups to fp32 that pass the plan's gates; returns the
        restored node names, the search facts and the chosen graph's path."""
        quality = state.plan.quality
        if all(g is None for g in (quality.max_perplexity_ratio, quality.min_top1_agreement, quality.max_kl_divergence)):
            raise StageError(self.name, "mixed_precision: auto needs a quality gate to aim for",
                             hint="set quality.max_perplexity_ratio (or --accuracy-budget), or mixed_precision: off")
        quantized = onnx.load(str(target), load_external_data=True)
        float_weights = {i.name: i for i in onnx.load(str(float_path), load_external_data=True).graph.initializer}
        groups = ranked_groups(candidates, state.sensitivity or state.activation_stats)
        windows = eval_windows(quality.eval_text, quality.windows, quality.window_len,
                               lambda text: state.tokenizer(text, add_special_tokens=False)["input_ids"])
        kv = kv_shape(state.model.config)
        metrics = WindowMetrics(session_logits(str(state.reference_onnx), kv), windows)
        trials: list[dict[str, Any]] = []

        def passes(k: int) -> bool:
            progress(self.name, len(trials), None, f"mixed precision: trying {k} of {len(groups)} groups in fp32")
            keep = {n for group in groups[:k] for n in group}
            trial = restore_float(quantized, float_weights, keep) if keep else quantized
            result = metrics.measure(session_logits(trial.SerializeToString(), kv))
            trials.append({"fp32_groups": k, "fp32_matmuls": len(keep), **{m: round(v, 4) for m, v in result.items()}})
            return not gate_failures(result, quality)

        k = search_prefix(passes, len(groups))
        if k is None or k == len(groups):
            best = max(trials[:-1] or trials, key=lambda t: t["top1_agreement"])
            raise StageError(self.name, f"only keeping every weight MatMul in fp32 meets the gates (best partial: {best})",
                             hint="relax quality.* (or --accuracy-budget), or build with --profile cpu-fp32")
        keep = {n for group in groups[:k] for n in group}
        if keep:
            target = state.work_dir / "mixed" / "model.onnx"
            save_external(restore_float(quantized, float_weights, keep), target)
        modules = sorted(candidates[n] for n in keep)
        return keep, {"trials": trials, "fp32_groups": k, "fp32_modules": modules}, target
