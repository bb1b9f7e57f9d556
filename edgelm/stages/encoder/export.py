"""Encoder builds: export to ONNX with dynamic batch and sequence, then fuse, each checked.

The export is torch.onnx.export(dynamo=True) of the model with its head, attention as one
MultiHeadAttention per layer (export/encoder_attention.py). Parity: the ONNX output equals
PyTorch's on a padded probe batch at the real (unpadded) positions, and a text's output does not
depend on the padding beside it. The fuse stage runs onnxruntime's transformer optimizer with the
family's passes (SkipLayerNormalization, BiasGelu, ...), counts the fused ops against the
profile's `encoder.required_fusions`, and checks parity again."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgelm.errors import StageError
from edgelm.onnx_graph import count_ops, reference_session
from edgelm.pipeline.encoder_results import EncoderExportResult
from edgelm.pipeline.results import FuseResult
from edgelm.pipeline.stage import BuildState, Progress

PARITY_ATOL = 1e-3
_PROBE = ("The quick brown fox jumps over the lazy dog.", "Edge devices run small models offline.",
          "A much longer probe sentence, so that the batch is padded: shorter rows get padding beside them, "
          "which must change nothing.", "ok")


def graph_inputs(arch: Any, config: Any) -> tuple[str, ...]:
    return ("input_ids", "attention_mask") + (("token_type_ids",) if arch.takes_token_type_ids(config) else ())


def output_name(task: str) -> str:
    return "last_hidden_state" if task == "feature-extraction" else "logits"


def probe_feeds(tokenizer: Any, inputs: tuple[str, ...], max_length: int) -> dict[str, np.ndarray]:
    encoded = tokenizer(list(_PROBE), padding=True, truncation=True, max_length=max_length, return_tensors="np")
    feeds = {"input_ids": encoded["input_ids"].astype(np.int64), "attention_mask": encoded["attention_mask"].astype(np.int64)}
    if "token_type_ids" in inputs:
        feeds["token_type_ids"] = np.zeros_like(feeds["input_ids"])
    return feeds


def torch_output(model: Any, feeds: dict[str, np.ndarray], task: str) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(**{name: torch.from_numpy(value) for name, value in feeds.items()})
    return (out.last_hidden_state if task == "feature-extraction" else out.logits).float().numpy()


def max_diff(a: np.ndarray, b: np.ndarray, mask: np.ndarray, task: str) -> float:
    """Largest difference at real positions (padding rows of a token-level output are ignored)."""
    if task == "sequence-classification":
        return float(np.abs(a - b).max())
    return float(np.abs(a - b)[mask.astype(bool)].max())


def export_encoder(model: Any, inputs: tuple[str, ...], task: str, target: Path, opset: int,
                   static_seq_len: int | None = None) -> None:
    """Dynamic batch and sequence, attention as MultiHeadAttention; with `static_seq_len`, batch 1
    and exactly that many tokens, attention in plain ops (what an NPU compiler takes)."""
    import contextlib
    import io

    import torch

    from edgelm.onnx_graph import save_external
    from edgelm.stages.export.encoder_attention import STATIC_IMPLEMENTATION, translation_table

    class Graph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any = None) -> Any:
            extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra)
            return out.last_hidden_state if task == "feature-extraction" else out.logits

    shape = (1, static_seq_len) if static_seq_len else (2, 8)
    example = {name: torch.ones(shape, dtype=torch.int64) if name == "attention_mask" else
               torch.full(shape, 5, dtype=torch.int64) if name == "input_ids" else
               torch.zeros(shape, dtype=torch.int64) for name in inputs}
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    dynamic = None if static_seq_len else {name: {0: batch, 1: seq} for name in inputs}
    implementation = model.config._attn_implementation
    if static_seq_len:
        model.config._attn_implementation = STATIC_IMPLEMENTATION  # MatMul, Softmax, a bounded mask: no contrib op
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            program = torch.onnx.export(Graph().eval(), (), kwargs=example, dynamo=True, input_names=list(inputs),
                                        output_names=[output_name(task)], opset_version=opset, optimize=True,
                                        dynamic_shapes=dynamic, custom_translation_table=translation_table())
    finally:
        model.config._attn_implementation = implementation
    target.parent.mkdir(parents=True, exist_ok=True)
    save_external(program.model_proto, target)


def check_parity(onnx_path: Path, state: BuildState, reference: np.ndarray, feeds: dict[str, np.ndarray],
                 what: str) -> float:
    task = state.encoder.task
    session = reference_session(onnx_path)
    out = session.run(None, feeds)[0]
    diff = max_diff(out, reference, feeds["attention_mask"], task)
    alone = session.run(None, {name: value[:1, : int(feeds["attention_mask"][0].sum())] for name, value in feeds.items()})[0]
    padded = max_diff(alone, out[:1, : alone.shape[1]] if task != "sequence-classification" else out[:1],
                      np.ones(alone.shape[:2]), task)
    worst = max(diff, padded)
    if not np.isfinite(worst) or worst > PARITY_ATOL:
        raise StageError(what, f"the ONNX {task} output differs from PyTorch by {worst:.3g} (limit {PARITY_ATOL})",
                         hint="report this with the model's config.json (--debug shows the traceback)")
    return worst


class ExportEncoder:
    name = EncoderExportResult.stage
    title = "Export encoder to ONNX (dynamic batch and sequence, MultiHeadAttention)"

    def run(self, state: BuildState, progress: Progress) -> EncoderExportResult:
        from edgelm.arch import encoder_for_config

        inputs = graph_inputs(encoder_for_config(state.model.config), state.model.config)
        target = state.work_dir / "export" / "model.onnx"
        progress(self.name, 0, None, "torch.onnx.export (dynamo)")
        export_encoder(state.model, inputs, state.encoder.task, target, state.plan.profile.export.opset)
        feeds = probe_feeds(state.tokenizer, inputs, state.max_seq_len)
        reference = torch_output(state.model, feeds, state.encoder.task)
        diff = check_parity(target, state, reference, feeds, self.name)
        state.reference_onnx = state.current_onnx = target
        if state.plan.profile.encoder.static_seq_len:  # the shipped graph; the dynamic one stays the reference
            length = state.max_seq_len = min(state.max_seq_len, state.plan.profile.encoder.static_seq_len)
            fixed = state.work_dir / "static" / "model.onnx"
            export_encoder(state.model, inputs, state.encoder.task, fixed, state.plan.profile.export.opset, length)
            diff = max(diff, static_parity(fixed, feeds, reference, length, state))
            if diff > PARITY_ATOL:
                raise StageError(self.name, f"the fixed-shape graph differs from PyTorch by {diff:.3g} (limit {PARITY_ATOL})",
                                 hint="report this with the model's config.json")
            state.current_onnx = fixed
        size = sum(p.stat().st_size for p in target.parent.iterdir()) / 1e6
        return EncoderExportResult(inputs=list(inputs), output=output_name(state.encoder.task), opset=state.plan.profile.export.opset,
                                   size_mb=round(size, 1), max_abs_diff=diff, attention=_ops(target).get("MultiHeadAttention", 0),
                                   plain_attention=encoder_for_config(state.model.config).attention_refusal(state.model.config),
                                   probe=(feeds, reference))


class FuseEncoder:
    name = "fuse"
    title = "Fuse graph (onnxruntime.transformers optimizer, encoder passes)"

    def run(self, state: BuildState, progress: Progress) -> FuseResult:
        from onnxruntime.transformers.optimizer import optimize_model

        from edgelm.arch import encoder_for_config

        if not state.plan.profile.fusions.enabled:
            return FuseResult(skipped="fusions disabled by the profile")
        arch = encoder_for_config(state.model.config)
        hidden, heads, _ = arch.sizes(state.model.config)
        source = with_norm_biases(state.current_onnx, state.work_dir / "biased" / "model.onnx")
        optimized = optimize_model(str(source), model_type=arch.optimizer_model_type, num_heads=heads,
                                   hidden_size=hidden, opt_level=0, use_gpu=False)
        target = state.work_dir / "fused" / "model.onnx"
        target.parent.mkdir(parents=True, exist_ok=True)
        optimized.save_model_to_file(str(target), use_external_data_format=True, all_tensors_to_one_file=True)
        ops = _ops(target)
        wanted = state.plan.profile.encoder.required_fusions
        if arch.attention_refusal(state.model.config):  # plain attention: no MultiHeadAttention to count
            wanted = tuple(op for op in wanted if op != "MultiHeadAttention")
        fused = {op: ops.get(op, 0) for op in dict.fromkeys((*wanted, "SkipLayerNormalization", "BiasGelu", "FastGelu",
                                                              "EmbedLayerNormalization", "LayerNormalization")) if ops.get(op)}
        missing = [op for op in wanted if not ops.get(op)]
        if missing:
            raise StageError(self.name, f"required fusion(s) {', '.join(missing)} not found after optimization",
                             hint="this model's graph does not match onnxruntime's encoder patterns; use a profile "
                                  "without them in encoder.required_fusions, and report the model")
        feeds, reference = state.result(EncoderExportResult).probe
        diff = check_parity(target, state, reference, feeds, self.name)
        state.current_onnx = target
        return FuseResult(fused=fused, max_abs_diff_vs_export=diff)


def with_norm_biases(path: Path, target: Path) -> Path:
    """Bias-free LayerNormalization nodes (ModernBERT's) given an explicit zero bias: onnxruntime's
    SkipLayerNormalization fusion reads a third input that such a node lacks (IndexError)."""
    import onnx
    from onnx import numpy_helper

    from edgelm.onnx_graph import save_external

    model = onnx.load(str(path))
    scales = {init.name: init for init in model.graph.initializer}
    missing = [node for node in model.graph.node if node.op_type == "LayerNormalization" and len(node.input) == 2
               and node.input[1] in scales]
    if not missing:
        return path
    for node in missing:
        bias = numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(scales[node.input[1]])), node.name + "_zero_bias")
        model.graph.initializer.append(bias)
        node.input.append(bias.name)
    save_external(model, target)
    return target


def _ops(path: Path) -> dict[str, int]:
    import onnx

    return count_ops(onnx.load(str(path), load_external_data=False))


def static_parity(path: Path, feeds: dict[str, np.ndarray], reference: np.ndarray, length: int, state: BuildState) -> float:
    """The fixed-shape graph against PyTorch, one probe text at a time, padded to `length`."""
    session, task, worst = reference_session(path), state.encoder.task, 0.0
    for row in range(len(feeds["input_ids"])):
        one = {name: _pad(value[row:row + 1], length, state.tokenizer.pad_token_id if name == "input_ids" else 0)
               for name, value in feeds.items()}
        out = session.run(None, one)[0]
        out = out if task == "sequence-classification" else out[:, : reference.shape[1]]
        worst = max(worst, max_diff(out, reference[row:row + 1], feeds["attention_mask"][row:row + 1], task))
    return worst


def _pad(value: np.ndarray, length: int, fill: int) -> np.ndarray:
    out = np.full((value.shape[0], length), fill or 0, dtype=value.dtype)
    out[:, : value.shape[1]] = value
    return out
