"""Typed stage results: what the manifest records, what inspect reads back, and how each is worded."""

from __future__ import annotations

from edgelm.pipeline.results import (RESULT_TYPES, AwqResult, SmoothResult, from_record)


def test_a_record_names_only_what_happened_and_never_the_artefacts():
    result = SmoothResult(max_outlier_ratio_before=12.0, worst_inputs={"a": 12.0}, outlier_ratios={"a": 12.0},
                          activation_ranges={"a": (-1.0, 1.0)})
    assert result.record() == {"max_outlier_ratio_before": 12.0, "worst_inputs": {"a": 12.0}}
    assert result.note() == "off; max input outlier ratio 12.0"


def test_every_stage_of_a_real_build_reads_back_from_its_manifest(tiny_bundle_report):
    stages = tiny_bundle_report.manifest.provenance["stages"]
    assert set(stages) <= set(RESULT_TYPES)
    for name, record in stages.items():
        result = from_record(name, record)
        assert isinstance(result, RESULT_TYPES[name])
        assert result.record() == {k: v for k, v in record.items() if k != "seconds"}, name
        assert result.note() == tiny_bundle_report.results[name].note()
    assert from_record("a-stage-from-a-newer-edgelm", {"x": 1}) is None


def test_awq_that_left_some_inputs_unscaled_still_shows_its_row():
    partial = AwqResult(groups=4, mean_alpha=0.5, mean_relative_error_before=0.2, mean_relative_error_after=0.1,
                        unscaled_inputs=["model.layers.0.mlp.down_proj"])
    assert partial.shown and partial.note().endswith("; 1 left unscaled")
    assert AwqResult(skipped="quantization.activation_aware is off").shown is False
