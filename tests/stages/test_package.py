"""The package phase: the bundle's files first, their quality proven through the runtime before
any manifest exists, then manifest.json written once from the typed stage results."""

from __future__ import annotations

import json

import pytest

import edgelm_runtime
from edgelm import api
from edgelm.pipeline.results import PackageResult, PruneResult, QualityResult
from edgelm.stages import package
from edgelm.stages.check.quality import CheckQuality
from edgelm.stages.package import pruning_record


def test_the_manifest_is_written_once_after_the_quality_check(tiny_model_dir, tiny_recipe, tmp_path, monkeypatch):
    out = tmp_path / "bundle"
    writes, seen_by_quality = [], []
    real_write, real_check = package.write_manifest, CheckQuality.run

    def counting_write(folder, manifest):
        writes.append((folder.name, dict(manifest.quality)))
        return real_write(folder, manifest)

    def watching_check(self, state, progress):
        seen_by_quality.append(sorted(p.name for p in state.bundle_dir.iterdir()))
        return real_check(self, state, progress)

    monkeypatch.setattr(package, "write_manifest", counting_write)
    monkeypatch.setattr(CheckQuality, "run", watching_check)
    report = api.build(api.plan_build(profile="cpu-fp32", recipe=tiny_recipe, model=str(tiny_model_dir), name="once"), out)

    bundle_writes = [w for w in writes if w[0] != "reference"]  # the quality check's fp32 reference is its own bundle
    assert len(bundle_writes) == 1 and bundle_writes[0][1]["perplexity_ratio"] == report.manifest.quality["perplexity_ratio"]
    assert seen_by_quality and "manifest.json" not in seen_by_quality[0] and "model.onnx" in seen_by_quality[0]
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["quality"] == report.results["quality"].record()
    # every stage before the manifest, in build order, with its seconds
    assert list(on_disk["provenance"]["stages"]) == [s.name for s in api.PIPELINE][:-1]
    assert all(entry["seconds"] is not None for entry in on_disk["provenance"]["stages"].values())
    assert on_disk["fusions"] == report.results["fuse"].fused
    edgelm_runtime.load_bundle(out, verify=True)  # every file's sha256 matches the one manifest


def test_package_lists_the_manifest_among_the_bundles_files(tiny_bundle_report):
    result = tiny_bundle_report.results["package"]
    assert isinstance(result, PackageResult)
    assert sorted(p.name for p in tiny_bundle_report.output.iterdir()) == result.files
    assert result.size_split["layers_mb"] > 0 and result.compressed_mb is None  # zlib size only for pruned builds


def test_pruning_record_compares_the_bundle_with_the_unpruned_model():
    prune = PruneResult(kind="structured", importance="wanda", params_before=100, params_after=90,
                        perplexity_before=20.0, perplexity_pruned=22.0)
    packaged = PackageResult(size_mb=1.5, compressed_mb=1.2)
    record = pruning_record(prune, packaged, QualityResult(perplexity=21.0))
    assert record["bundle_mb"] == 1.5 and record["compressed_mb"] == 1.2
    assert record["bundle_perplexity_ratio_vs_unpruned"] == pytest.approx(1.05)
    assert pruning_record(PruneResult(skipped="no prune section"), packaged, None) == {}
