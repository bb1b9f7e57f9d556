"""The bundle contract: manifests round-trip, and bad or unsafe bundles are refused with a fix."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import re

import pytest

import edgelm_runtime as er
from edgelm_runtime.bundle import MANIFEST_FILE, write_manifest


def test_manifest_round_trips_through_dict_and_json(tiny_bundle: Path, tmp_path: Path) -> None:
    manifest = er.read_manifest(tiny_bundle)
    assert er.Manifest.from_dict(manifest.to_dict()) == manifest
    write_manifest(tmp_path, manifest)
    assert er.read_manifest(tmp_path) == manifest


def test_newer_format_version_asks_for_an_upgrade(tiny_bundle: Path) -> None:
    data = er.read_manifest(tiny_bundle).to_dict() | {"format_version": er.FORMAT_VERSION + 1}
    with pytest.raises(er.BundleError, match="newer") as caught:
        er.Manifest.from_dict(data)
    assert "pip install -U edgelm-runtime" in caught.value.hint


@pytest.mark.parametrize(("where", "field_name"), [("", "colour"), ("kv", "layers"), ("generation", "temp")])
def test_unknown_fields_are_rejected_by_name(tiny_bundle: Path, where: str, field_name: str) -> None:
    data = json.loads((tiny_bundle / MANIFEST_FILE).read_text(encoding="utf-8"))
    (data[where] if where else data)[field_name] = 1
    with pytest.raises(er.BundleError, match=f"{field_name}: unknown field"):
        er.Manifest.from_dict(data)


def test_missing_manifest_is_a_bundle_error(tmp_path: Path) -> None:
    with pytest.raises(er.BundleError, match="no manifest.json"):
        er.load_bundle(tmp_path)


def test_path_leaving_the_bundle_is_refused(bundle_copy: Path, edit_manifest: Callable) -> None:
    (bundle_copy.parent / "outside.bin").write_bytes(b"x")
    edit_manifest(bundle_copy, lambda m: m["files"].update({"../outside.bin": {"sha256": "0" * 64, "size": 1}}))
    with pytest.raises(er.BundleError, match="leaves the bundle folder"):
        er.load_bundle(bundle_copy)


def test_size_mismatch_is_refused_without_verify(bundle_copy: Path) -> None:
    tokenizer_file = er.read_manifest(bundle_copy).tokenizer_file
    with open(bundle_copy / tokenizer_file, "ab") as handle:
        handle.write(b" ")
    with pytest.raises(er.BundleError, match=f"{tokenizer_file} is .* bytes, manifest says"):
        er.load_bundle(bundle_copy, verify=False)


def test_missing_file_is_refused(bundle_copy: Path) -> None:
    (bundle_copy / er.read_manifest(bundle_copy).tokenizer_file).unlink()
    with pytest.raises(er.BundleError, match="is missing"):
        er.load_bundle(bundle_copy)


def test_hash_mismatch_is_refused_only_with_verify(bundle_copy: Path, edit_manifest: Callable) -> None:
    (bundle_copy / "notes.txt").write_text("built on a Tuesday", encoding="utf-8")
    edit_manifest(bundle_copy, lambda m: None, relist_files=True)
    (bundle_copy / "notes.txt").write_text("built on a Thursda", encoding="utf-8")  # same size
    er.load_bundle(bundle_copy, verify=False)
    with pytest.raises(er.BundleError, match="notes.txt sha256 does not match"):
        er.load_bundle(bundle_copy, verify=True)


def test_unavailable_provider_is_named(bundle_copy: Path, edit_manifest: Callable) -> None:
    edit_manifest(bundle_copy, lambda m: m.update(provider="MadeUpExecutionProvider"))
    with pytest.raises(er.BundleError, match="MadeUpExecutionProvider is not available") as caught:
        er.load_bundle(bundle_copy)
    assert caught.value.hint


def test_manifest_io_names_must_exist_in_the_model(bundle_copy: Path, edit_manifest: Callable) -> None:
    edit_manifest(bundle_copy, lambda m: m.setdefault("io", {}).update(logits="scores"))
    with pytest.raises(er.BundleError, match="no output 'scores'"):
        er.load_bundle(bundle_copy)


def test_frozen_manifest(tiny_bundle: Path) -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        er.read_manifest(tiny_bundle).max_seq_len = 1  # type: ignore[misc]


@pytest.mark.parametrize("edit,field", [
    (lambda m: m["kv"].update(num_kv_heads="3"), "kv.num_kv_heads: expected int"),
    (lambda m: m["kv"].update(head_dim=0), "kv.head_dim: must be between 1 and 4096"),
    (lambda m: m.update(session_options=1.5), "session_options: expected dict"),
    (lambda m: m.update(prompt_templates_file=["x"]), "prompt_templates_file: expected str | None"),
    (lambda m: m["io"].update(past_key="past.{0}.key"), "io.past_key"),
    (lambda m: m["kv"].update(head_dim=8), "kv.head_dim is 8 but model.onnx's past_key_values.0.key has 16"),
    (lambda m: m["session_options"].update(graph_optimization_level={}), "graph_optimization_level"),
    (lambda m: m["generation"].update(top_p=-2.0), "generation defaults: top_p is -2.0"),
    (lambda m: m["files"].update({"tok\x00.json": {"sha256": "0" * 64, "size": 1}}), "is not a file name"),
])
def test_mistyped_manifest_fields_are_named(bundle_copy: Path, edit_manifest: Callable, edit, field: str) -> None:
    edit_manifest(bundle_copy, edit)
    with pytest.raises(er.BundleError, match=re.escape(field)):
        er.load_bundle(bundle_copy)
