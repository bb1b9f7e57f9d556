"""provider_options: a manifest field (provider name -> options) that reaches onnxruntime's
InferenceSession `providers` argument; manifests written before it still load."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import onnxruntime as ort
import pytest

import edgelm_runtime as er
from edgelm_runtime import session as session_module
from edgelm_runtime.bundle import MANIFEST_FILE, write_manifest
from edgelm_runtime.session import session_providers

CPU = "CPUExecutionProvider"
OPTIONS = {CPU: {"arena_extend_strategy": "kSameAsRequested"}}


def test_provider_options_round_trip_through_the_manifest(tiny_bundle: Path, tmp_path: Path) -> None:
    manifest = er.read_manifest(tiny_bundle)
    assert manifest.provider_options == {}
    changed = er.Manifest.from_dict(manifest.to_dict() | {"provider_options": OPTIONS})
    write_manifest(tmp_path, changed)
    assert json.loads((tmp_path / MANIFEST_FILE).read_text(encoding="utf-8"))["provider_options"] == OPTIONS
    assert er.read_manifest(tmp_path).provider_options == OPTIONS


def test_manifest_without_provider_options_still_loads(bundle_copy: Path, edit_manifest: Callable) -> None:
    def as_format_3(data: dict) -> None:
        del data["provider_options"]
        data["format_version"] = 3

    edit_manifest(bundle_copy, as_format_3)
    llm = er.load_bundle(bundle_copy, threads=1)
    assert llm.manifest.provider_options == {} and llm.manifest.format_version == 3
    assert len(llm.logits(llm.tokenizer.encode("hello"))) > 0


def test_provider_options_reach_the_inference_session(bundle_copy: Path, edit_manifest: Callable,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    real = ort.InferenceSession

    def recording(path, sess_options=None, providers=None, **kwargs):
        seen.append(providers)
        return real(path, sess_options=sess_options, providers=providers, **kwargs)

    monkeypatch.setattr(session_module.ort, "InferenceSession", recording)
    edit_manifest(bundle_copy, lambda m: m.update(provider_options=OPTIONS))
    llm = er.load_bundle(bundle_copy, threads=1)
    assert seen == [[(CPU, OPTIONS[CPU])]]
    assert len(llm.logits(llm.tokenizer.encode("hello"))) > 0


def test_options_go_only_to_the_providers_in_use(tiny_bundle: Path) -> None:
    manifest = er.Manifest.from_dict(er.read_manifest(tiny_bundle).to_dict() | {
        "provider_options": {"CUDAExecutionProvider": {"device_id": 1}, CPU: {"use_arena": False}}})
    assert session_providers(manifest, "CUDAExecutionProvider") == [
        ("CUDAExecutionProvider", {"device_id": 1}), (CPU, {"use_arena": False})]
    assert session_providers(manifest, CPU) == [(CPU, {"use_arena": False})]
    plain = er.read_manifest(tiny_bundle)
    assert session_providers(plain, "CUDAExecutionProvider") == ["CUDAExecutionProvider", CPU]


@pytest.mark.parametrize("bad", [{CPU: ["use_arena"]}, {CPU: {"use_arena": [1]}}, ["CPUExecutionProvider"]])
def test_mistyped_provider_options_are_named(tiny_bundle: Path, bad) -> None:
    data = er.read_manifest(tiny_bundle).to_dict() | {"provider_options": bad}
    with pytest.raises(er.BundleError, match="provider_options"):
        er.Manifest.from_dict(data)
