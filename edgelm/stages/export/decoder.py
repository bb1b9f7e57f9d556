"""Export the model to one ONNX decoder graph with a KV cache, and prove it matches PyTorch.

Exporter: `torch.onnx.export(dynamo=True)` over a small wrapper that takes flat past tensors and
builds a DynamicCache. Chosen because it traces the model exactly as the installed transformers
runs it (optimum-onnx 0.1 needs transformers < 4.58 and silently exports SmolLM2 with the wrong
rope_theta), keeps tied embeddings as one initializer, and gives one graph for prefill (empty
past) and decode. Parity with PyTorch, with and without past, is checked here, every build.

The fused route (fused.py, GroupQueryAttention) is taken for every family it can express;
a model it cannot express comes here, the reason recorded as the export's `fused_refused` fact."""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np

from edgelm.errors import StageError, write_error
from edgelm.onnx_graph import reference_session, save_external
from edgelm.pipeline.results import AdaptersResult, ExportResult
from edgelm.pipeline.stage import BuildState, Progress
from edgelm_runtime.bundle import ModelIO

logger = logging.getLogger(__name__)
IO = ModelIO()
LOGITS_TO_KEEP = "logits_to_keep"
PARITY_TEXT = "The quick brown fox jumps over the lazy dog. Edge devices run small language models offline."


def kv_shape(config: Any) -> tuple[int, int, int]:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return config.num_hidden_layers, kv_heads, head_dim


def io_names(num_layers: int) -> tuple[list[str], list[str], list[str], list[str]]:
    past = [name.format(i=i) for i in range(num_layers) for name in (IO.past_key, IO.past_value)]
    present = [name.format(i=i) for i in range(num_layers) for name in (IO.present_key, IO.present_value)]
    return [IO.input_ids, IO.attention_mask, IO.position_ids], past, [IO.logits], present


def graph_io(fused: bool) -> ModelIO:
    """The manifest's io for a graph from this exporter (the fused route has no position_ids)."""
    return ModelIO(position_ids=None if fused else IO.position_ids, logits_to_keep=LOGITS_TO_KEEP)


def decoder_feed(input_names: set[str], ids: np.ndarray, past: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Inputs for one run after `past` (all positions' logits), filling only what the graph takes."""
    batch, seq = ids.shape
    start = next(iter(past.values())).shape[2]
    feed = {IO.input_ids: ids, IO.attention_mask: np.ones((batch, start + seq), np.int64),
            IO.position_ids: np.arange(start, start + seq, dtype=np.int64)[None].repeat(batch, 0),
            LOGITS_TO_KEEP: np.asarray([seq], np.int64), **past}
    return {name: value for name, value in feed.items() if name in input_names}


def _decoder_wrapper(model: Any, num_layers: int) -> Any:
    import torch
    from transformers.cache_utils import DynamicCache

    class FlatKVDecoder(torch.nn.Module):
        """(input_ids, attention_mask, position_ids, *past) -> (logits, *present)."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, *past):
            # Full-length layers for every layer, sliding ones included: the bundle's KV layout is
            # one uniform full-length cache per layer (DynamicCache(config=...) would make sliding
            # layers that drop the keys a window has passed); the model's own mask still applies
            # the window to them.
            cache = DynamicCache()
            for i in range(num_layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=cache, use_cache=True)
            present = []
            for layer in out.past_key_values.layers[:num_layers]:
                present += [layer.keys, layer.values]
            return (out.logits, *present)

    return FlatKVDecoder().eval()


def export_decoder(model: Any, path: Path, opset: int, fused: bool = False, max_positions: int = 8192) -> None:
    """Export with dynamic batch/sequence/past sizes (past may be empty). fused: the
    GroupQueryAttention route (rows without padding); else the generic dynamo graph."""
    import torch

    num_layers, kv_heads, head_dim = kv_shape(model.config)
    inputs, past_names, outputs, present_names = io_names(num_layers)
    batch, seq, past_len, total = (torch.export.Dim(n) for n in ("batch", "sequence", "past_sequence", "total_sequence"))
    # Sample sizes > 1 everywhere: torch.export specialises dimensions whose sample size is 0 or 1.
    b, s, p = 2, 4, 3
    ids, mask = torch.ones(b, s, dtype=torch.int64), torch.ones(b, s + p, dtype=torch.int64)
    past = [torch.zeros(b, kv_heads, p, head_dim) for _ in past_names]
    if fused:
        from edgelm.stages.export.fused import fused_decoder, translation_table

        module, sample, names = fused_decoder(model, max_positions), (ids, mask, *past), inputs[:2]
        dynamic = ({0: batch, 1: seq}, {0: batch, 1: total}, tuple({0: batch, 2: past_len} for _ in past_names))
        table = translation_table()
    else:
        module, names, table = _decoder_wrapper(model, num_layers), inputs, None
        sample = (ids, mask, torch.arange(p, p + s).repeat(b, 1), *past)
        dynamic = ({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq},
                   tuple({0: batch, 2: past_len} for _ in past_names))
    path.parent.mkdir(parents=True, exist_ok=True)
    # The exporter prints its progress and warnings to stdout/stderr; keep them in the log.
    chatter = io.StringIO()
    with torch.no_grad(), contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
        torch.onnx.export(module, sample, str(path), dynamo=True, input_names=names + past_names,
                          output_names=outputs + present_names, dynamic_shapes=dynamic, opset_version=opset,
                          external_data=True, verbose=False, custom_translation_table=table)
    logger.debug("torch.onnx.export output:\n%s", chatter.getvalue())
    add_logits_to_keep(path)


def add_logits_to_keep(path: Path) -> None:
    """Give the graph an int64 [1] input that keeps the logits of the last N positions only.

    Why: a 128-token prefill otherwise projects every position onto the 49k vocabulary (a third
    of its work on SmolLM2) to sample from the last one. Scoring passes N = all positions. The
    Slice goes in front of the LM head MatMul, so quantization still sees a plain MatMul."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(path))
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    head = producer.get(IO.logits)
    while head is not None and head.op_type != "MatMul":  # e.g. a bias Add or a Cast after the head
        head = producer.get(head.input[0])
    if head is None:
        raise StageError("export", "no MatMul produces the logits; cannot limit them to the last positions",
                         hint="use export.graph: generic and report this model")
    graph.input.append(helper.make_tensor_value_info(LOGITS_TO_KEEP, TensorProto.INT64, [1]))
    kept, negative = f"{head.input[0]}/last_positions", f"{LOGITS_TO_KEEP}/negative"
    graph.initializer.extend([onnx.numpy_helper.from_array(np.asarray([1], np.int64), "logits_to_keep/axis"),
                              onnx.numpy_helper.from_array(np.asarray([np.iinfo(np.int64).max], np.int64),
                                                           "logits_to_keep/end")])
    index = list(graph.node).index(head)
    graph.node.insert(index, helper.make_node("Slice", [head.input[0], negative, "logits_to_keep/end",
                                                        "logits_to_keep/axis"], [kept], name="logits_to_keep/Slice"))
    graph.node.insert(index, helper.make_node("Neg", [LOGITS_TO_KEEP], [negative], name="logits_to_keep/Neg"))
    head.input[0] = kept
    save_external(model, path)  # its weights were loaded above: the old data file is rewritten


def export_failure(exc: Exception, stage: str) -> Exception:
    """The one-line error for an exporter failure (a full disk is said as such)."""
    return write_error(exc, stage) or StageError(
        stage, f"torch.onnx.export failed: {str(exc).strip().splitlines()[0][:300]}",
        hint="rerun with --debug for the exporter's full report")


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
    num_layers, kv_heads, head_dim = kv
    _, past_names, _, _ = io_names(num_layers)
    session = reference_session(str(path))
    names = {i.name for i in session.get_inputs()}
    empty = {n: np.zeros((input_ids.shape[0], kv_heads, 0, head_dim), np.float32) for n in past_names}
    prefill = session.run(None, decoder_feed(names, input_ids[:, :-1], empty))
    step = session.run(None, decoder_feed(names, input_ids[:, -1:], dict(zip(past_names, prefill[1:]))))
    return prefill[0], step[0]


def session_logits(model: str | bytes, kv: tuple[int, int, int]) -> Any:
    """A function ids -> logits (S, V) of one prefill through onnxruntime (path or serialized model)."""
    num_layers, kv_heads, head_dim = kv
    _, past_names, _, _ = io_names(num_layers)
    session = reference_session(model)
    names = {i.name for i in session.get_inputs()}
    empty = {n: np.zeros((1, kv_heads, 0, head_dim), np.float32) for n in past_names}

    def logits(ids: list[int]) -> np.ndarray:
        return session.run([IO.logits], decoder_feed(names, np.asarray([ids], np.int64), empty))[0][0]

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

    def run(self, state: BuildState, progress: Progress) -> ExportResult:
        from edgelm.stages.export.fused import fused_export_refusal

        path = state.work_dir / "reference" / "model.onnx"
        settings = state.plan.profile.export
        refusal = fused_export_refusal(state.model) if settings.graph == "fused" else None
        if refusal:
            logger.warning("fused export not possible (%s); exporting the generic graph", refusal)
        fused = settings.graph == "fused" and refusal is None
        try:
            export_decoder(state.model, path, settings.opset, fused=fused, max_positions=state.max_seq_len)
        except StageError:
            raise
        except Exception as exc:
            raise export_failure(exc, self.name) from exc
        progress(self.name, 0, None, "checking parity with PyTorch")
        parity = check_parity(state.model, state.tokenizer, path, settings.parity_atol, self.name)
        kept = getattr(state.result(AdaptersResult), "kept", ())
        if kept:  # runtime adapters: a LoRA path per adapted projection, empty by default (runtime_adapters.py)
            from edgelm.stages.runtime_adapters import attach_lora

            attach_lora(state, path, kept)
        state.reference_onnx = state.current_onnx = path
        state.graph_io = graph_io(fused)
        size = sum(p.stat().st_size for p in path.parent.iterdir())
        return ExportResult(exporter="torch.onnx.export(dynamo=True)", graph="fused" if fused else "generic",
                            opset=settings.opset, size_mb=round(size / 1e6, 1), parity=parity, fused_refused=refusal,
                            role="reference" if settings.static_shapes else None)
