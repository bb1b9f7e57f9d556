"""Every family through both dynamic export routes and the static NPU graphs, against transformers.

The fused route (GroupQueryAttention) must express every family the arch describes (none falls
back today), the generic route must too, and greedy decoding through the runtime must give
model.generate's tokens over a prompt plus generation far longer than the tiny configs' window
(16), so sliding layers, NoPE layers, partial rotary and the soft-caps are all exercised."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch

import edgelm_runtime as er
from edgelm.errors import StageError

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3", "smollm3")
# families the fused route hands to the generic one, with the reason it records
FUSED_FALLBACK: dict[str, str] = {}
KV_WINDOW = 64
PROMPT = "The weather today is bright and the wind is calm"
NEW_TOKENS = 48


def _load(folder: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def _long_ids(tokenizer, count: int = 64) -> np.ndarray:
    from edgelm.stages.export.decoder import PARITY_TEXT

    ids = tokenizer(PARITY_TEXT)["input_ids"]
    return np.asarray([(ids * (count // len(ids) + 1))[:count]], dtype=np.int64)


def _gqa_attributes(path: Path) -> list[dict]:
    graph = onnx.load(str(path), load_external_data=False).graph
    return [{a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            for node in graph.node if node.op_type == "GroupQueryAttention"]


@pytest.fixture(scope="module")
def bundles(family_model_dirs, tiny_recipe, tmp_path_factory):
    """cpu-fp32 bundles (the fused route), built on first use per family."""
    from edgelm import api

    built: dict[str, object] = {}
    root = tmp_path_factory.mktemp("family-bundles")

    def build(family: str):
        if family not in built:
            plan = api.plan_build(profile="cpu-fp32", recipe=tiny_recipe, model=str(family_model_dirs[family]), name=family)
            built[family] = api.build(plan, root / family)
        return built[family]

    return build


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_route_matches_pytorch_and_decodes_like_generate(family, bundles, family_model_dirs):
    from edgelm_runtime.generate import decode_tokens
    from edgelm_runtime.sampling import Sampler

    report = bundles(family)
    export = report.manifest.provenance["stages"]["export"]
    if family in FUSED_FALLBACK:
        assert export["graph"] == "generic" and FUSED_FALLBACK[family] in export["fused_refused"]
    else:
        assert export["graph"] == "fused" and "fused_refused" not in export
    assert max(export["parity"]["max_abs_diff_no_past"], export["parity"]["max_abs_diff_with_past"]) < 1e-4

    model, _ = _load(family_model_dirs[family])
    llm = er.load_bundle(report.output, threads=1)
    prompt = llm.tokenizer.encode(PROMPT)
    assert len(prompt) + NEW_TOKENS > 4 * 16  # four times the tiny configs' window
    # eos switched off on both sides, so every family runs all 48 steps
    got = list(decode_tokens(llm.decoder, prompt, NEW_TOKENS, Sampler(er.SamplingParams()), (), llm.manifest.max_seq_len))
    with torch.no_grad():
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                  eos_token_id=None)[0, len(prompt):].tolist()
    assert len(got) == NEW_TOKENS and got == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_graph_states_each_layers_attention(family, bundles, family_model_dirs):
    """Per layer: the window as local_window_size (transformers' sliding_window, measured equal),
    rotary inside the op or not (NoPE layers; partial rotary whose cos width is not a multiple of 8
    is applied before it), the arch's scale and soft-cap."""
    from edgelm.arch import for_model
    from edgelm.stages.export.fused import rotary_inside

    model, _ = _load(family_model_dirs[family])
    arch = for_model(model)
    attributes = _gqa_attributes(bundles(family).output / "model.onnx")
    assert len(attributes) == model.config.num_hidden_layers
    for index, got in enumerate(attributes):
        facts = arch.attention(model.config, index)
        assert got["local_window_size"] == (facts.sliding_window or -1)
        assert got["do_rotary"] == int(rotary_inside(facts))
        assert got["scale"] == pytest.approx(facts.scale) and got["softcap"] == pytest.approx(facts.softcap or 0.0)
    if family == "smollm3":
        assert [a["do_rotary"] for a in attributes] == [1, 1, 0]  # no_rope_layers [1, 1, 0]
    if family in ("mistral", "gemma3_text"):
        assert {a["local_window_size"] for a in attributes} >= {16}
    if family == "phi3":  # rotary_dim 12: a cos cache of 6 columns, which the op refuses
        assert {a["do_rotary"] for a in attributes} == {0}


@pytest.mark.parametrize("family", FAMILIES)
def test_generic_route_matches_pytorch_past_the_window(family, family_model_dirs, tmp_path):
    from edgelm.stages.export.decoder import check_parity, export_decoder, kv_shape, onnx_logits, torch_reference

    model, tokenizer = _load(family_model_dirs[family])
    path = tmp_path / "model.onnx"
    export_decoder(model, path, 18, fused=False)
    check_parity(model, tokenizer, path, 1e-4, "export")
    ids = _long_ids(tokenizer)  # a 63-token prefill, then one step on the cache: 4x the window
    (torch_prefill, torch_step), (onnx_prefill, onnx_step) = torch_reference(model, ids), onnx_logits(path, ids, kv_shape(model.config))
    assert max(np.abs(torch_prefill - onnx_prefill).max(), np.abs(torch_step - onnx_step).max()) < 1e-4


def test_partial_rotary_runs_inside_group_query_attention(tmp_path):
    """Phi-4-mini's shape: rotary_dim 0.75 * 64 = 48, a cos cache of 24 columns (a multiple of 8):
    GroupQueryAttention rotates the first 48 dims itself and passes the rest through."""
    from tests.conftest import save_tiny_family

    from edgelm.stages.export.decoder import check_parity, export_decoder

    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
            "short_factor": [1.0 + 0.05 * i for i in range(24)], "long_factor": [1.0 + i for i in range(24)]}
    model, tokenizer = _load(save_tiny_family(tmp_path / "phi3-wide", "phi3", hidden_size=256, rope_parameters=rope))
    path = tmp_path / "onnx" / "model.onnx"
    export_decoder(model, path, 18, fused=True, max_positions=256)
    assert [a["do_rotary"] for a in _gqa_attributes(path)] == [1, 1]
    cos = next(i for i in onnx.load(str(path), load_external_data=False).graph.initializer if i.name.startswith("cos"))
    assert list(cos.dims) == [256, 24]
    check_parity(model, tokenizer, path, 1e-4, "export")


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_decoder_reference_math_matches_pytorch(family, family_model_dirs):
    """The custom op's reference implementation (what tracing and eager runs compute) is the model."""
    from edgelm.stages.export.decoder import kv_shape
    from edgelm.stages.export.fused import fused_decoder

    model, _ = _load(family_model_dirs[family])
    decoder = fused_decoder(model, 128)
    layers, kv_heads, head_dim = kv_shape(model.config)
    ids = torch.arange(3, 43)[None] % model.config.vocab_size
    with torch.no_grad():
        expected = model(ids).logits
        empty = [torch.zeros(1, kv_heads, 0, head_dim) for _ in range(2 * layers)]
        prefill = decoder(ids[:, :30], torch.ones(1, 30, dtype=torch.long), *empty)
        step = decoder(ids[:, 30:], torch.ones(1, 40, dtype=torch.long), *prefill[1:])
    assert float((torch.cat([prefill[0], step[0]], 1) - expected).abs().max()) < 1e-4


def _static_parity(model, tokenizer, folder: Path, projections: str = "matmul") -> dict:
    from edgelm.stages.export.static import StaticGraphs, check_static_parity, export_static_graph
    from edgelm_runtime.bundle import StaticLayout

    layout = StaticLayout(decode_model_file="decode.onnx", prefill_len=16, kv_window=KV_WINDOW)
    graphs = StaticGraphs(folder / "prefill" / "model.onnx", folder / "decode" / "decode.onnx", layout)
    for seq, path in ((layout.prefill_len, graphs.prefill), (1, graphs.decode)):
        export_static_graph(model, path, 23, seq, layout, projections)
    return check_static_parity(model, tokenizer, graphs, 1e-4, "static")


@pytest.mark.parametrize("family", FAMILIES)
def test_static_graphs_match_pytorch_or_are_refused(family, family_model_dirs, tmp_path):
    from edgelm.arch import for_model
    from edgelm.stages.export.static import ExportStatic

    model, tokenizer = _load(family_model_dirs[family])
    refusal = for_model(model).static_refusal(model, KV_WINDOW)
    if family in ("mistral", "gemma3_text"):  # window 16 < the 64 slots one bias covers
        assert refusal and "sliding-window" in refusal
        export = SimpleNamespace(static_shapes=True, kv_window=KV_WINDOW, prefill_len=16)
        state = SimpleNamespace(plan=SimpleNamespace(profile=SimpleNamespace(export=export)), model=model, max_seq_len=256)
        with pytest.raises(StageError, match="sliding-window"):
            ExportStatic().run(state, lambda *args: None)
        return
    assert refusal is None
    assert _static_parity(model, tokenizer, tmp_path, "conv1x1" if family == "phi3" else "matmul")["max_abs_diff"] < 1e-4


def test_static_graphs_express_gemma_when_the_window_covers_the_context(tmp_path):
    """Gemma 3 with a window (128) longer than the bundle's context (64): one bias serves every
    layer, and the (1 + w) norms, post-norms, q/k norms, scaled embedding, per-type rotary tables,
    GELU-tanh and the final soft-cap all come out right in the static graphs."""
    from tests.conftest import save_tiny_family

    model, tokenizer = _load(save_tiny_family(tmp_path / "gemma", "gemma3_text", sliding_window=128))
    assert _static_parity(model, tokenizer, tmp_path / "static", "conv1x1")["max_abs_diff"] < 1e-4


@pytest.mark.parametrize("window, softcap, rotary_dim, packed", [
    (None, None, 16, True),   # Llama: packed q/k/v, full rotary
    (6, 30.0, 16, False),     # a window shorter than the past, soft-capped scores, q/k apart
    (None, None, 0, False),   # a NoPE layer
    (4, None, 48, True),      # partial rotary inside the op (Phi-4-mini: 96 of 128), windowed
])
def test_gqa_reference_math_is_what_onnxruntime_computes(window, softcap, rotary_dim, packed, tmp_path):
    """The custom op's reference implementation against onnxruntime's GroupQueryAttention on the
    same inputs: a 20-token past, 5 new tokens, so the window and the soft-cap both bite."""
    import onnxruntime as ort

    from edgelm.stages.export.fused import _register_ops, translation_table

    gqa, heads, kv_heads, head_dim, past_len, seq = _register_ops(), 4, 2, 64, 20, 5
    torch.manual_seed(0)
    angles = torch.arange(64)[:, None] * 10000.0 ** (-torch.arange(0, max(rotary_dim, 2), 2) / max(rotary_dim, 2))
    cos, sin = (angles.cos(), angles.sin()) if rotary_dim else (None, None)

    class Probe(torch.nn.Module):
        def forward(self, q, k, v, past_key, past_value, mask):
            seqlens, total = (mask.sum(1) - 1).to(torch.int32), torch.tensor(mask.shape[1], dtype=torch.int32)
            query, key, value = (torch.cat([q, k, v], -1), None, None) if packed else (q, k, v)
            return gqa(query, key, value, past_key, past_value, seqlens, total, cos, sin, heads, kv_heads, 0.3,
                       softcap or 0.0, window or -1, int(rotary_dim > 0))

    inputs = (torch.randn(1, seq, heads * head_dim), torch.randn(1, seq, kv_heads * head_dim),
              torch.randn(1, seq, kv_heads * head_dim), torch.randn(1, kv_heads, past_len, head_dim),
              torch.randn(1, kv_heads, past_len, head_dim), torch.ones(1, past_len + seq, dtype=torch.int64))
    path = tmp_path / "gqa.onnx"
    torch.onnx.export(Probe(), inputs, str(path), dynamo=True, custom_translation_table=translation_table(),
                      input_names=["q", "k", "v", "past_key", "past_value", "mask"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {name: x.numpy() for name, x in zip(["q", "k", "v", "past_key", "past_value", "mask"], inputs)
                             if name in {i.name for i in session.get_inputs()}})
    with torch.no_grad():
        expected = Probe()(*inputs)
    for ours, theirs in zip(expected, got):
        np.testing.assert_allclose(ours.numpy(), theirs, atol=1e-5)
