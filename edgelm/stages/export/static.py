"""Export the decoder as fixed-shape graphs for NPUs: a prefill chunk and a one-token decode step,
both over a fixed KV window, and prove they compute what PyTorch does.

Why hand-written: NPU compilers (QNN's HTP) take only static shapes and plain ops. Fixing the
dimensions of a dynamic export afterwards (onnxruntime's make_dynamic_shape_fixed) leaves a cache
that grows by Concat every step and shape arithmetic the HTP cannot run, and no exporter plans
a chunked prefill over a capped window. So the decoder is re-expressed with the model's own
modules: attention as plain MatMul + Softmax with an additive bias the runtime builds (it masks
empty window slots, padding and the future), GQA by grouping the query heads of each KV head (no
repeated KV), rotary from cos/sin tables gathered at the given positions, and only the new KV rows
as outputs, which the runtime writes into its window. Every tensor is rank 4 or less."""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgelm.arch import for_model
from edgelm.errors import StageError
from edgelm.quant.rotation import ROTATION_MODULE
from edgelm.pipeline.results import StaticResult
from edgelm.pipeline.stage import BuildState, Progress
from edgelm.stages.export.decoder import PARITY_TEXT, export_failure, io_names, kv_shape
from edgelm_runtime.bundle import DECODE_MODEL_FILE, MODEL_FILE, ModelIO, StaticLayout

logger = logging.getLogger(__name__)
IO = ModelIO()
PREFILL_FILE, DECODE_FILE = MODEL_FILE, DECODE_MODEL_FILE  # the bundle's names (edgelm_runtime.bundle)


@dataclass(frozen=True)
class StaticGraphs:
    prefill: Path
    decode: Path
    layout: StaticLayout


def static_decoder(model: Any, seq: int, window: int, positions: int, projections: str = "matmul") -> Any:
    """(input_ids, position_ids, attention_bias, *past) -> (logits, *new KV rows), shapes fixed:
    ids and positions (1, seq) int32, bias (1, 1, seq, window + seq), past (1, kv_heads, window,
    head_dim), logits (1, seq, vocab), new rows (1, kv_heads, seq, head_dim).

    Everything family-specific comes from the arch (edgelm.arch): role weights (a packed Linear
    runs once, then splits), norms before and after each branch, q/k norms, per-layer rotary
    tables (none for NoPE layers; partial rotary), attention scale and soft-cap, the embedding
    (its scale inside) and the final soft-cap.

    projections "conv1x1": every Linear (and the LM head) as a 1x1 Conv over (1, features, 1, seq),
    because QNN's HTP quantizes Conv weights per output channel but MatMul weights only per
    tensor (measured on SmolLM2, 16-bit activations: ratio 1.077 per tensor, 1.036 per channel)."""
    import torch

    from edgelm.arch.base import ATTENTION_INPUT, MLP_INPUT

    arch, config = for_model(model), model.config
    layers, head = arch.layers(model), arch.head(model)
    attentions = [arch.attention(config, i) for i in range(len(layers))]
    tables = arch.rotary_tables(model, positions)
    table_keys = sorted({a.rotary for a in attentions if a.rotary is not None})
    span = window + seq

    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        width = cos.shape[-1]  # the rotary dims; the rest of each head passes through (partial rotary)
        half, rotary = width // 2, x[..., :width]
        out = rotary * cos + torch.cat([-rotary[..., half:], rotary[..., :half]], dim=-1) * sin
        return out if width == x.shape[-1] else torch.cat([out, x[..., width:]], dim=-1)

    class Decoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embedding = arch.embedding(model)
            self.layers = layers
            self.final_norm = arch.final_norm(model)
            self.softcap = arch.final_softcap(config)
            # The weights as the constants the projections take: (out, in, 1, 1) kernels for 1x1
            # Convs (views, no copy), and the LM head its own constant: reached through the tied
            # embedding's Transpose, or an in-graph Unsqueeze, QDQ would quantize them as activations.
            self.kernel_names: dict[int, str] = {}
            for index, module in enumerate([*arch.layer_linears(model).values(), head]):
                weight = module.weight.detach()
                self.register_buffer(f"kernel_{index}", weight[:, :, None, None] if projections == "conv1x1" else
                                     (weight.clone() if module is head else weight), persistent=False)
                self.kernel_names[id(module)] = f"kernel_{index}"
            # norm weights as the norm multiplies by them: (1 + w) for Gemma's, folded here once
            self.norm_names: dict[int, str] = {}
            norms = [self.final_norm]
            for layer in layers:
                found = arch.norms(layer)
                norms += [found.attention_in, found.attention_out, found.mlp_in, found.mlp_out, *(arch.head_norms(layer) or ())]
            for index, module in enumerate(m for m in norms if m is not None):
                self.register_buffer(f"norm_{index}", (module.weight.detach() + arch.norm_offset).contiguous(),
                                     persistent=False)
                self.norm_names[id(module)] = f"norm_{index}"
            for index, key in enumerate(table_keys):
                cos, sin = tables[key]
                self.register_buffer(f"cos_{index}", cos.float().contiguous())
                self.register_buffer(f"sin_{index}", sin.float().contiguous())

        def norm(self, module: Any, x: torch.Tensor) -> torch.Tensor:
            # one RMSNormalization op (opset 23): decomposed into Pow/ReduceMean/Sqrt, each with its own
            # 16-bit scale, the squares of the residual stream's outliers wiped out every other channel
            # (perplexity ratio 2600 on SmolLM2, measured); fused, the NPU computes it at full precision
            eps = getattr(module, "variance_epsilon", None) or getattr(module, "eps", 1e-6)
            return torch.nn.functional.rms_norm(x, (x.shape[-1],), getattr(self, self.norm_names[id(module)]), eps)

        def linear(self, module: Any, x: torch.Tensor) -> torch.Tensor:
            """x (1, seq, in) through `module` (a Linear)."""
            kernel = getattr(self, self.kernel_names[id(module)])
            if hasattr(module, ROTATION_MODULE):  # a rotated down projection (compress/rotate.py)
                x = getattr(module, ROTATION_MODULE)(x)
            if projections == "conv1x1":
                # (1, in, 1, seq) is NHWC's (1, 1, seq, in) seen as NCHW: on an NHWC NPU the
                # transposes around the Conv cancel with the layout transform's own
                y = torch.nn.functional.conv2d(x.transpose(1, 2).unsqueeze(2), kernel, module.bias)
                return y.squeeze(2).transpose(1, 2)
            return torch.nn.functional.linear(x, kernel, module.bias)

        def roles(self, layer: Any, roles: tuple[str, ...], x: torch.Tensor) -> list[torch.Tensor]:
            """The outputs of `roles` on x: each Linear runs once, a packed one then splits by rows."""
            weights = [arch.role(layer, role, config) for role in roles]
            outputs: dict[int, torch.Tensor] = {}
            for weight in weights:
                if id(weight.linear) not in outputs:
                    outputs[id(weight.linear)] = self.linear(weight.linear, x)
            return [outputs[id(w.linear)] if w.rows == slice(0, w.linear.out_features) else
                    outputs[id(w.linear)][..., w.rows] for w in weights]

        def forward(self, input_ids, position_ids, attention_bias, *past):
            hidden = self.embedding(input_ids)
            # (1, 1, seq, rotary_dim) per table, as Gather (fancy indexing exports GatherND, which takes no int32)
            rotary = [(torch.nn.functional.embedding(position_ids, getattr(self, f"cos_{i}"))[:, None],
                       torch.nn.functional.embedding(position_ids, getattr(self, f"sin_{i}"))[:, None])
                      for i in range(len(table_keys))]
            present = []
            for i, (layer, facts) in enumerate(zip(self.layers, attentions)):
                heads, kv_heads, head_dim = facts.heads, facts.kv_heads, facts.head_dim
                groups, norms, head_norms = heads // kv_heads, arch.norms(layer), arch.head_norms(layer)
                q, k, v = self.roles(layer, ATTENTION_INPUT, self.norm(norms.attention_in, hidden))
                q = q.view(1, seq, heads, head_dim).transpose(1, 2)
                k = k.view(1, seq, kv_heads, head_dim).transpose(1, 2)
                v = v.view(1, seq, kv_heads, head_dim).transpose(1, 2)
                if head_norms is not None:
                    q, k = self.norm(head_norms[0], q), self.norm(head_norms[1], k)
                if facts.rotary is not None:
                    cos, sin = rotary[table_keys.index(facts.rotary)]
                    q, k = rotate(q, cos, sin), rotate(k, cos, sin)
                q = q * facts.scale
                cached_keys, values = torch.cat([past[2 * i], k], dim=2), torch.cat([past[2 * i + 1], v], dim=2)
                # query heads h = kv * groups + g share KV head kv: fold the groups into the rows
                scores = (q.reshape(1, kv_heads, groups * seq, head_dim) @ cached_keys.transpose(2, 3)).reshape(1, heads, seq, span)
                if facts.softcap:
                    scores = torch.tanh(scores / facts.softcap) * facts.softcap
                probs = torch.softmax(scores + attention_bias, dim=-1).reshape(1, kv_heads, groups * seq, span)
                out = (probs @ values).reshape(1, heads, seq, head_dim).transpose(1, 2).reshape(1, seq, heads * head_dim)
                out = self.linear(arch.role(layer, "o", config).linear, out)
                hidden = hidden + (self.norm(norms.attention_out, out) if norms.attention_out is not None else out)
                gate, up = self.roles(layer, MLP_INPUT, self.norm(norms.mlp_in, hidden))
                out = self.linear(arch.role(layer, "down", config).linear, arch.mlp_activation(layer)(gate) * up)
                hidden = hidden + (self.norm(norms.mlp_out, out) if norms.mlp_out is not None else out)
                present += [k, v]
            logits = self.linear(head, self.norm(self.final_norm, hidden))
            if self.softcap:
                logits = torch.tanh(logits / self.softcap) * self.softcap
            return (logits, *present)

    return Decoder().eval()


def graph_names(num_layers: int, layout: StaticLayout) -> tuple[list[str], list[str]]:
    _, past, outputs, present = io_names(num_layers)
    return [IO.input_ids, IO.position_ids, layout.attention_bias, *past], outputs + present


def export_static_graph(model: Any, path: Path, opset: int, seq: int, layout: StaticLayout,
                        projections: str = "matmul") -> None:
    import torch

    num_layers, kv_heads, head_dim = kv_shape(model.config)
    module = static_decoder(model, seq, layout.kv_window, layout.kv_window + layout.prefill_len, projections)
    sample = (torch.zeros(1, seq, dtype=torch.int32), torch.arange(seq, dtype=torch.int32)[None],
              torch.zeros(1, 1, seq, layout.kv_window + seq),
              *[torch.zeros(1, kv_heads, layout.kv_window, head_dim) for _ in range(2 * num_layers)])
    inputs, outputs = graph_names(num_layers, layout)
    path.parent.mkdir(parents=True, exist_ok=True)
    chatter = io.StringIO()
    with torch.no_grad(), contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
        torch.onnx.export(module, sample, str(path), dynamo=True, input_names=inputs, output_names=outputs,
                          opset_version=opset, external_data=True, verbose=False)
    logger.debug("torch.onnx.export output:\n%s", chatter.getvalue())


def check_static_parity(model: Any, tokenizer: Any, graphs: StaticGraphs, atol: float, stage: str) -> dict[str, float]:
    """The static graphs driven by the runtime's StaticDecoderSession (chunked prefill longer than
    one chunk, then decode steps) against PyTorch on the same tokens."""
    import torch

    from edgelm_runtime.static import StaticWindow, open_static_sessions

    layout = graphs.layout
    ids = tokenizer(PARITY_TEXT)["input_ids"]
    ids = (ids * (1 + (layout.prefill_len + 4) // max(len(ids), 1)))[: layout.prefill_len + 4]
    with torch.no_grad():
        expected = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    num_layers, kv_heads, head_dim = kv_shape(model.config)
    prefill, decode = open_static_sessions(graphs.prefill, graphs.decode)
    window = StaticWindow(prefill, decode, layout, num_layers, kv_heads, head_dim, np.float32)
    split = layout.prefill_len + 1  # a full chunk, then a padded one of one token; the rest one by one
    got = [window.feed(np.asarray(ids[:layout.prefill_len]), all_logits=True),
           window.feed(np.asarray(ids[layout.prefill_len:split]), all_logits=True)]
    got += [window.feed(np.asarray([token]), all_logits=True) for token in ids[split:]]
    logits = np.concatenate(got)
    worst = float(np.abs(logits - expected).max())
    if not np.isfinite(worst) or worst > atol:
        raise StageError(stage, f"static graphs differ from PyTorch by {worst:.3g} (limit {atol:g})",
                         hint="the static export is wrong for this model; report it with --debug output")
    return {"max_abs_diff": worst, "probe_tokens": len(ids), "atol": atol}


class ExportStatic:
    name = "static"
    title = "Export fixed-shape prefill and decode graphs (NPU)"

    def run(self, state: BuildState, progress: Progress) -> StaticResult:
        settings = state.plan.profile.export
        if not settings.static_shapes:
            return StaticResult(skipped="dynamic shapes")
        # one attention bias serves every layer; a query sees at most kv_window positions (the
        # bundle's context limit), so a sliding window at least that long never cuts anything
        refusal = for_model(state.model).static_refusal(state.model, settings.kv_window)
        if refusal:
            raise StageError(self.name, f"this model cannot be exported with static shapes: {refusal}",
                             hint="use a dynamic-shape profile (cpu-int8, gpu-fp16) for this model")
        if settings.kv_window > state.max_seq_len:
            raise StageError(self.name, f"export.kv_window {settings.kv_window} exceeds max_seq_len {state.max_seq_len}",
                             hint=f"set export.kv_window to at most {state.max_seq_len}, or raise --max-seq-len")
        layout = StaticLayout(decode_model_file=DECODE_FILE, prefill_len=settings.prefill_len,
                              kv_window=settings.kv_window)
        folder = state.work_dir / "static"
        graphs = StaticGraphs(folder / "prefill" / PREFILL_FILE, folder / "decode" / DECODE_FILE, layout)
        try:
            for seq, path in ((layout.prefill_len, graphs.prefill), (1, graphs.decode)):
                progress(self.name, 0, None, f"exporting the {seq}-token graph")
                export_static_graph(state.model, path, settings.opset, seq, layout, settings.projections)
        except Exception as exc:
            raise export_failure(exc, self.name) from exc
        progress(self.name, 0, None, "checking parity with PyTorch")
        parity = check_static_parity(state.model, state.tokenizer, graphs, settings.parity_atol, self.name)
        state.static_graphs = graphs
        state.current_onnx = graphs.prefill
        return StaticResult(prefill_len=layout.prefill_len, kv_window=layout.kv_window, projections=settings.projections,
                            parity=parity, ops=sorted(_op_types(graphs.prefill) | _op_types(graphs.decode)))


def _op_types(path: Path) -> set[str]:
    import onnx

    return {node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node}
