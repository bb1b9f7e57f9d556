"""Quantization schemes are registered units (edgelm/quant/): every profile's config type has one,
an unknown type is refused, and each unit decides its labels, its pre-export passes and its
hardware needs. Copy the parametrized tables here when adding a scheme."""

from __future__ import annotations

import re
import typing
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

import pytest

from edgelm._render import precision
from edgelm.pipeline.results import from_record
from edgelm.config import load_profile
from edgelm.config.profile import Frozen, Quantization, StaticQDQ, list_profiles
from edgelm.errors import ConfigError
from edgelm.hardware import computes_in_int8, hardware_needs
from edgelm.quant import PREP_PASSES, SCHEMES, scheme_for, scheme_for_mode
from edgelm.stages.compress.awq import ActivationAwareScales
from edgelm.stages.compress.rotate import Rotate
from edgelm.stages.compress.sensitivity import MeasureSensitivity
from edgelm.stages.compress.smooth import Smooth

LABELS = {
    "cpu-fp32": "fp32",
    "cpu-int4-fast": "int4 weights, block 32, int8 compute",
    "cpu-int4": "int4 weights, block 16 asym, int8 compute",
    "cpu-int8": "int8 weights, block 32, int8 compute, Hadamard-rotated",
    "cpu-int8-fidelity": "int8 weights, block 16, int8 compute",
    "cpu-w8a8": "W8A8 static QDQ on weight MatMuls (uint8 weights, uint8 activations), Hadamard-rotated",
    "gpu-fp16": "fp16",
    "npu-qdq": "W8A16 static QDQ on every op (int8 weights, uint16 activations), static shapes, Hadamard-rotated",
}

# profile -> {pre-export pass: None when it runs, else the reason it records}
NO_ROTATION = "quantization.rotation is none"
PREP = {
    "cpu-fp32": {"rotate": "quantization mode none", "smooth": "quantization mode none",
                 "awq": "quantization.activation_aware is off", "sensitivity": "mixed_precision is off"},
    "cpu-int4-fast": {"rotate": NO_ROTATION, "smooth": "quantization mode weight-only",
                      "awq": "quantization.activation_aware is off", "sensitivity": "mixed_precision is off"},
    "cpu-int4": {"rotate": NO_ROTATION, "smooth": "quantization mode weight-only", "awq": None,
                 "sensitivity": "mixed_precision is off"},
    "cpu-int8": {"rotate": None, "smooth": "quantization mode weight-only", "awq": "quantization.activation_aware is off",
                 "sensitivity": "mixed_precision is off"},
    "cpu-int8-fidelity": {"rotate": NO_ROTATION, "smooth": "quantization mode weight-only",
                          "awq": "quantization.activation_aware is off", "sensitivity": "mixed_precision is off"},
    "cpu-w8a8": {"rotate": None, "smooth": None, "awq": "quantization.activation_aware is off",
                 "sensitivity": "mixed_precision is off"},
    "gpu-fp16": {"rotate": "quantization mode float16", "smooth": "quantization mode float16",
                 "awq": "quantization.activation_aware is off", "sensitivity": "mixed_precision is off"},
    "npu-qdq": {"rotate": None, "smooth": None, "awq": "quantization.activation_aware is off",
                "sensitivity": "mixed_precision is off"},
}

INT8 = {"cpu-fp32": False, "cpu-int4-fast": True, "cpu-int4": True, "cpu-int8": True, "cpu-int8-fidelity": True,
        "cpu-w8a8": True,
        "gpu-fp16": False, "npu-qdq": True}


class Int3(Frozen):
    """A config type nobody registered."""

    mode: Literal["int3"]


def _config_types() -> tuple[type, ...]:
    union = typing.get_args(Quantization)[0]  # Annotated[Union[...], Field(discriminator=...)]
    return typing.get_args(union)


def test_every_profile_config_type_has_a_unit():
    assert set(SCHEMES) == set(_config_types())
    for config in _config_types():
        (mode,) = typing.get_args(config.model_fields["mode"].annotation)
        assert SCHEMES[config].mode == mode and scheme_for_mode(mode) is SCHEMES[config]
    for profile in list_profiles():
        assert scheme_for(profile.quantization) is SCHEMES[type(profile.quantization)]


def test_the_tables_here_cover_every_builtin_profile():
    assert {p.name for p in list_profiles()} == set(LABELS) == set(PREP) == set(INT8)


def test_a_made_up_config_type_is_refused_not_guessed():
    settings = Int3(mode="int3")
    with pytest.raises(ConfigError, match="no scheme is registered for Int3 .mode 'int3'.") as caught:
        scheme_for(settings)
    assert "SCHEMES" in caught.value.hint and "docs/extending.md" in caught.value.hint
    profile = SimpleNamespace(name="made-up", provider="CPUExecutionProvider", quantization=settings)
    for asks in (precision, computes_in_int8):  # precision() used to fall through to weight-only fields
        with pytest.raises(ConfigError, match="Int3"):
            asks(profile)
    with pytest.raises(ConfigError, match="mode 'int3'"):
        scheme_for_mode("int3")


def test_a_subclass_is_not_its_parents_scheme():
    class Tweaked(StaticQDQ):
        pass

    with pytest.raises(ConfigError, match="Tweaked"):
        scheme_for(Tweaked(mode="static-qdq"))


@pytest.mark.parametrize("name", sorted(LABELS))
def test_each_units_label_for_each_builtin_profile(name):
    profile = load_profile(name)
    assert scheme_for(profile.quantization).label(profile) == LABELS[name]
    assert precision(profile) == LABELS[name]


@pytest.mark.parametrize("name", sorted(PREP))
def test_the_unit_decides_which_prep_passes_apply(name):
    settings = load_profile(name).quantization
    scheme = scheme_for(settings)
    assert set(PREP[name]) == set(PREP_PASSES)
    assert {p: scheme.skip_reason(p, settings) for p in PREP_PASSES} == PREP[name]


@pytest.mark.parametrize("name", sorted(PREP))
def test_the_prep_stages_record_the_units_skip_reason(name):
    """The stages ask the unit: a skipped pass returns its reason before touching the model."""
    state = SimpleNamespace(plan=SimpleNamespace(profile=load_profile(name)))
    for stage in (Rotate(), Smooth(), ActivationAwareScales(), MeasureSensitivity()):
        reason = PREP[name][stage.name]
        if reason is not None:
            assert stage.run(state, lambda *a: None).record() == {"skipped": reason}


def test_settings_not_the_profile_name_decide_the_passes():
    w8a8 = load_profile("cpu-w8a8").quantization
    auto = w8a8.model_copy(update={"mixed_precision": "auto"})
    assert scheme_for(auto).skip_reason("sensitivity", auto) is None
    int8 = load_profile("cpu-int8").quantization
    aware = int8.model_copy(update={"activation_aware": True})
    assert scheme_for(aware).skip_reason("awq", aware) is None
    with pytest.raises(KeyError, match="unknown pre-export pass 'prune'"):
        scheme_for(w8a8).skip_reason("prune", w8a8)


@pytest.mark.parametrize("name", sorted(INT8))
def test_the_unit_states_its_hardware_needs(name):
    profile = load_profile(name)
    assert computes_in_int8(profile) == INT8[name]
    assert hardware_needs(profile) == ({"int8_dot_product"} if INT8[name] else set())
    float_compute = profile.quantization.model_copy(update={"accuracy_level": 0}) \
        if profile.quantization.mode == "weight-only" else None
    if float_compute is not None:
        assert scheme_for(float_compute).needs(float_compute) == frozenset()


def test_the_unit_words_its_quantize_facts():
    assert from_record("quantize", {"mode": "none"}).note() == "none (fp32)"
    assert from_record("quantize", {"mode": "float16", "fp32_ops": ["Pow"], "size_mb_before": 2.0,
                                    "size_mb_after": 1.0}).note() == \
        "fp16 weights, activations and KV cache, fp32 kept: Pow, 2.0 -> 1.0 MB"
    facts = {"mode": "weight-only", "algorithm": "rtn", "bits": 4, "block_size": 32, "quantized_matmuls": 9,
             "int8_matmuls": 2, "quantized_embeddings": 1, "size_mb_before": 2.0, "size_mb_after": 0.5}
    assert from_record("quantize", facts).note() == "rtn 4-bit block 32, 9 MatMuls (2 at 8-bit) + embedding, 2.0 -> 0.5 MB"
    facts = {"mode": "static-qdq", "quantized_matmuls": 7, "kept_float": 2, "calibration_feeds": 12,
             "size_mb_before": 2.0, "size_mb_after": 0.6, "mixed_precision": {"trials": [{}, {}]}}
    assert from_record("quantize", facts).note() == "7 MatMuls, 12 calibration feeds, 2.0 -> 0.6 MB; auto: 2 fp32 after 2 trials"


def test_no_stage_tests_a_quantization_config_type():
    """Only edgelm/quant/ and the config models may branch on the config types."""
    package = Path(__file__).resolve().parents[2] / "edgelm"
    pattern = re.compile(r"isinstance\([^)]*\b(NoQuantization|StaticQDQ|WeightOnly|Float16)\b")
    found = [f"{path.relative_to(package)}:{number}" for path in sorted(package.rglob("*.py"))
             if path.relative_to(package).parts[0] not in ("quant", "config")
             for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if pattern.search(line)]
    assert not found, found
