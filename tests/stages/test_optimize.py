"""The fuse pass alone: onnxruntime's transformer optimizer folds the norms, the fused graph keeps
the export's function, a required fusion that does not happen fails by name, and a profile can
turn fusion off."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest

from edgelm import api
from edgelm.errors import StageError
from edgelm.pipeline.stage import no_progress
from edgelm.stages.export.decoder import PARITY_TEXT, kv_shape, onnx_logits
from edgelm.stages.optimize import FuseGraph
from tests.conftest import run_until


def _op_types(path):
    return collections.Counter(node.op_type for node in onnx.load(str(path), load_external_data=False).graph.node)


def _with_fusions(plan, **fields):
    profile = plan.profile.model_copy(update={"fusions": plan.profile.fusions.model_copy(update=fields)})
    return plan.model_copy(update={"profile": profile})


@pytest.fixture(scope="module")
def exported(tiny_model_dir, tiny_recipe, tmp_path_factory):
    plan = api.plan_build(profile="cpu-fp32", recipe=tiny_recipe, model=str(tiny_model_dir), name="fuse")
    return run_until(plan, tmp_path_factory.mktemp("fuse"), "export")


def test_fusion_folds_every_norm_and_keeps_the_exports_logits(exported, tmp_path):
    state = exported
    state.current_onnx = state.reference_onnx
    result = FuseGraph().run(state, no_progress)
    layers = state.model.config.num_hidden_layers
    fused = _op_types(state.current_onnx)
    exported_ops = _op_types(state.reference_onnx)
    # one residual Add + RMSNorm pair per sub-block after the first norm; the first and the final norm stand alone
    assert fused["SkipSimplifiedLayerNormalization"] == result.fused["SkipSimplifiedLayerNormalization"] >= 2 * layers - 1
    assert fused.get("SimplifiedLayerNormalization", 0) >= 1 and "Pow" not in fused and exported_ops.get("Pow", 0) > 0
    assert sum(fused.values()) < sum(exported_ops.values())
    ids = np.asarray([state.tokenizer(PARITY_TEXT)["input_ids"][:32]], dtype=np.int64)
    kv = kv_shape(state.model.config)
    (ref, ref_step), (new, new_step) = onnx_logits(state.reference_onnx, ids, kv), onnx_logits(state.current_onnx, ids, kv)
    diff = max(np.abs(ref - new).max(), np.abs(ref_step - new_step).max())
    assert diff <= state.plan.profile.export.parity_atol and result.max_abs_diff_vs_export == pytest.approx(diff, abs=1e-6)


def test_a_required_fusion_that_does_not_happen_fails_by_name(exported):
    state = exported
    plan, state.current_onnx = state.plan, state.reference_onnx
    state.plan = _with_fusions(plan, required=("BiasGelu",))
    try:
        with pytest.raises(StageError, match=r"required fusion BiasGelu did not happen") as failure:
            FuseGraph().run(state, no_progress)
    finally:
        state.plan = plan
    assert state.current_onnx == state.reference_onnx  # a failed pass hands nothing on
    assert "profile without that requirement" in failure.value.hint


def test_fusion_off_leaves_the_graph_and_says_so(exported):
    state = exported
    plan, before = state.plan, state.reference_onnx
    state.current_onnx = before
    state.plan = _with_fusions(plan, enabled=False)
    try:
        result = FuseGraph().run(state, no_progress)
    finally:
        state.plan = plan
    assert state.current_onnx == before and result.fused == {}
    assert result.shown and result.note() == "fusions disabled by the profile"
