"""Export the model to one ONNX decoder graph with a KV cache, and prove it matches PyTorch.

Exporter: `torch.onnx.export(dynamo=True)` over a small wrapper that takes flat past tensors and
builds a DynamicCache. Chosen because it traces the model exactly as the installed transformers
runs it (optimum-onnx 0.1 needs transformers < 4.58 and silently exports SmolLM2 with the wrong
rope_theta), keeps tied embeddings as one initializer, and gives one graph for prefill (empty
past) and decode. Parity with PyTorch, with and without past, is checked here, every build."""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np

from edgelm.errors import StageError
from edgelm.pipeline.stage import BuildState, Progress
from edgelm_runtime.bundle import ModelIO

logger = logging.getLogger(__name__)
IO = ModelIO()
PARITY_TEXT = "The quick brown fox jumps over the lazy dog. Edge devices run small language models offline."


def kv_shape(config: Any) -> tuple[int, int, int]:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return config.num_hidden_layers, kv_heads, head_dim


def io_names(num_layers: int) -> tuple[list[str], list[str], list[str], list[str]]:
    past = [name.format(i=i) for i in range(num_layers) for name in (IO.past_key, IO.past_value)]
    present = [name.format(i=i) for i in range(num_layers) for name in (IO.present_key, IO.present_value)]
    return [IO.input_ids, IO.attention_mask, IO.position_ids], past, [IO.logits], present


def _decoder_wrapper(model: Any, num_layers: int) -> Any:
    import torch
    from transformers.cache_utils import DynamicCache

    class FlatKVDecoder(torch.nn.Module):
        """(input_ids, attention_mask, position_ids, *past) -> (logits, *present)."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = DynamicCache(config=self.model.config)
            for i in range(num_layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=cache, use_cache=True)
            present = []
            for layer in out.past_key_values.layers[:num_layers]:
                present += [layer.keys, layer.values]
            return (out.logits, *present)

    return FlatKVDecoder().eval()


def export_decoder(model: Any, path: Path, opset: int) -> None:
    import torch

    num_layers, kv_heads, head_dim = kv_shape(model.config)
    inputs, past_names, outputs, present_names = io_names(num_layers)
    batch, seq, past_len, total = (torch.export.Dim(n) for n in ("batch", "sequence", "past_sequence", "total_sequence"))
    # Sample sizes > 1 everywhere: torch.export specialises dimensions whose sample size is 0 or 1.
    b, s, p = 2, 4, 3
    sample = (torch.ones(b, s, dtype=torch.int64), torch.ones(b, s + p, dtype=torch.int64),
              torch.arange(p, p + s).repeat(b, 1), *[torch.zeros(b, kv_heads, p, head_dim) for _ in past_names])
    dynamic = ({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq},
               tuple({0: batch, 2: past_len} for _ in past_names))
    path.parent.mkdir(parents=True, exist_ok=True)
    # The exporter prints its progress and warnings to stdout/stderr; keep them in the log.
    chatter = io.StringIO()
    with torch.no_grad(), contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
        torch.onnx.export(_decoder_wrapper(model, num_layers), sample, str(path), dynamo=True,
                          input_names=inputs + past_names, output_names=outputs + present_names,
                          dynamic_shapes=dynamic, opset_version=opset, external_data=True, verbose=False)
    logger.debug("torch.onnx.export output:\n%s", chatter.getvalue())


def torch_reference(model: Any, input_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """PyTorch logits of a prefill over all but the last token, then of that token decoded on the cache."""
    import torch

    ids = torch.from_numpy(input_ids)
    with torch.no_grad():
        prefix = model(input_ids=ids[:, :-1], use_cache=True)
        step = model(input_ids=ids[:, -1:], past_key_values=prefix.past_key_values, use_cache=True).logits.numpy()
    return prefix.logits.numpy(), step


def onnx_logits(path: Path, input_ids: np.ndarray, kv: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The same two computations through onnxruntime: prefill with empty past, then one decode step."""
    import onnxruntime as ort

    num_layers, kv_heads, head_dim = kv
    inputs, past_names, _, _ = io_names(num_layers)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    b, s = input_ids.shape
    empty = {n: np.zeros((b, kv_heads, 0, head_dim), np.float32) for n in past_names}
    prefill = session.run(None, {inputs[0]: input_ids[:, :-1], inputs[1]: np.ones((b, s - 1), np.int64),
                                 inputs[2]: np.arange(s - 1, dtype=np.int64)[None].repeat(b, 0), **empty})
    past = dict(zip(past_names, prefill[1:]))
    step = session.run(None, {inputs[0]: input_ids[:, -1:], inputs[1]: np.ones((b, s), np.int64),
                              inputs[2]: np.full((b, 1), s - 1, np.int64), **past})
    return prefill[0], step[0]


def session_logits(model: str | bytes, kv: tuple[int, int, int]) -> Any:
    """A function ids -> logits (S, V) of one prefill through onnxruntime (path or serialized model)."""
    import onnxruntime as ort

    num_layers, kv_heads, head_dim = kv
    inputs, past_names, _, _ = io_names(num_layers)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    empty = {n: np.zeros((1, kv_heads, 0, head_dim), np.float32) for n in past_names}

    def logits(ids: list[int]) -> np.ndarray:
        feed = {inputs[0]: np.asarray([ids], np.int64), inputs[1]: np.ones((1, len(ids)), np.int64),
                inputs[2]: np.arange(len(ids), dtype=np.int64)[None], **empty}
        return session.run([IO.logits], feed)[0][0]

    return logits


def check_parity(model: Any, tokenizer: Any, onnx_path: Path, atol: float, stage: str) -> dict[str, float]:
    ids = np.asarray([tokenizer(PARITY_TEXT)["input_ids"][:32]], dtype=np.int64)
    torch_prefill, torch_step = torch_reference(model, ids)
    onnx_prefill, onnx_step = onnx_logits(onnx_path, ids, kv_shape(model.config))
    no_past = float(np.abs(onnx_prefill - torch_prefill).max())
    with_past = float(np.abs(onnx_step - torch_step).max())
    logger.info("parity: no past %.2e, with past %.2e", no_past, with_past)
    worst = max(no_past, with_past)
    if not np.isfinite(worst) or worst > atol:
        raise StageError(stage, f"ONNX logits differ from PyTorch by {worst:.3g} (limit {atol:g})",
                         hint="the export is wrong for this model; report it with --debug output")
    return {"max_abs_diff_no_past": no_past, "max_abs_diff_with_past": with_past, "atol": atol,
            "probe_tokens": int(ids.shape[1])}


class ExportOnnx:
    name = "export"
    title = "Export ONNX decoder with KV cache (torch.onnx dynamo)"

    def run(self, state: BuildState, progress: Progress) -> dict[str, Any]:
        path = state.work_dir / "reference" / "model.onnx"
        try:
            export_decoder(state.model, path, state.plan.profile.export.opset)
        except Exception as exc:
            raise StageError(self.name, f"torch.onnx.export failed: {str(exc).strip().splitlines()[0][:300]}",
                             hint="rerun with --debug for the exporter's full report") from exc
        progress(self.name, 0, None, "checking parity with PyTorch")
        parity = check_parity(state.model, state.tokenizer, path, state.plan.profile.export.parity_atol, self.name)
        state.reference_onnx = state.current_onnx = path
        size = sum(p.stat().st_size for p in path.parent.iterdir())
        return {"exporter": "torch.onnx.export(dynamo=True)", "opset": state.plan.profile.export.opset,
                "size_mb": round(size / 1e6, 1), "parity": parity}
