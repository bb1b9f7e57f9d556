"""A tampered bundle cannot make onnxruntime read files outside it, and a hostile tokenizer.json
fails in one line when the bundle loads: checked by the runtime itself, whatever onnxruntime
release it runs on (it allows >= 1.20; older ones follow these paths)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from tokenizers import Tokenizer
from typer.testing import CliRunner

import edgelm_runtime as er
from edgelm.cli import app
from edgelm_runtime.bundle import MANIFEST_FILE, sha256_file
from edgelm_runtime.external_data import external_locations
from edgelm_runtime.tokenizer import BundleTokenizer

# Oniguruma gives up on this pattern's backtracking over a long letter run, and the Rust library
# panics (pyo3's PanicException, a BaseException): found with tokenizers 0.23
HOSTILE_REGEX = r"(\w|a)*b"
PANIC_TEXT = "b" + "a" * 40 + "c"


def _relist(bundle: Path, *names: str) -> None:
    """Record the new size and sha256 of `names` only (the rest of the manifest stays as built)."""
    path = bundle / MANIFEST_FILE
    data = json.loads(path.read_text())
    for name in names:
        data["files"][name] = {"sha256": sha256_file(bundle / name), "size": (bundle / name).stat().st_size}
    path.write_text(json.dumps(data))


def _point_weights_at(bundle: Path, location: str) -> None:
    """Make every external tensor of model.onnx read from `location` (a real copy of the weights, so
    an onnxruntime that followed it would load the model)."""
    import onnx

    model = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
    for init in model.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save_model(model, str(bundle / "model.onnx"))
    _relist(bundle, "model.onnx")


def _outside(bundle: Path) -> Path:
    outside = bundle.parent / "outside.data"
    outside.write_bytes((bundle / "model.onnx.data").read_bytes())
    return outside


class TestExternalDataStaysInTheBundle:
    @pytest.mark.parametrize("probe", ["absolute", "parent", "symlink", "unlisted"])
    def test_tampered_location_is_refused_by_load_and_verify(self, bundle_copy: Path, probe: str) -> None:
        outside = _outside(bundle_copy)
        if probe == "absolute":
            location, reason = str(outside), "is an absolute path"
        elif probe == "parent":
            location, reason = "../outside.data", "leaves the bundle folder"
        elif probe == "symlink":
            (bundle_copy / "weights.data").symlink_to(outside)
            location, reason = "weights.data", "resolves outside the bundle folder"
        else:
            (bundle_copy / "extra.data").write_bytes(outside.read_bytes())
            location, reason = "extra.data", "is not a file listed in manifest.json"
        _point_weights_at(bundle_copy, location)
        expected = f"model.onnx's external data location {location!r} {reason}"
        for verify in (False, True):
            with pytest.raises(er.BundleError, match=re.escape(expected)) as caught:
                er.load_bundle(bundle_copy, verify=verify)
            assert "\n" not in str(caught.value) and "tampered" in caught.value.hint
        result = CliRunner().invoke(app, ["verify", str(bundle_copy)])
        assert result.exit_code == 2 and expected in result.output and ": ok" not in result.output, result.output

    def test_an_untouched_bundle_still_loads_and_verifies(self, bundle_copy: Path) -> None:
        er.load_bundle(bundle_copy, verify=True, threads=1).generate("Hi", max_new_tokens=1)
        result = CliRunner().invoke(app, ["verify", str(bundle_copy)])
        assert result.exit_code == 0 and ": ok" in result.output, result.output

    def test_a_damaged_graph_is_one_bundle_error(self, bundle_copy: Path) -> None:
        (bundle_copy / "model.onnx").write_bytes(b"\x0a\xff\xff\xff\xff\x0f garbage")
        _relist(bundle_copy, "model.onnx")
        with pytest.raises(er.BundleError, match="model.onnx is not a readable ONNX file"):
            er.load_bundle(bundle_copy)


def test_locations_are_found_in_subgraphs_as_onnx_finds_them(tmp_path: Path) -> None:
    """The minimal protobuf reader sees every external tensor onnx sees, nested If branches included."""
    import numpy as np
    import onnx
    from onnx import TensorProto, external_data_helper, helper, numpy_helper

    def branch(name: str) -> onnx.GraphProto:
        weight = numpy_helper.from_array(np.ones((32, 32), np.float32), f"{name}_w")
        return helper.make_graph([helper.make_node("Identity", [f"{name}_w"], ["o"])], name, [],
                                 [helper.make_tensor_value_info("o", TensorProto.FLOAT, None)], [weight])

    inner = helper.make_node("If", ["c"], ["o"], then_branch=branch("a"), else_branch=branch("b"))
    outer_then = helper.make_graph([inner], "then", [], [helper.make_tensor_value_info("o", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("If", ["c"], ["r"], then_branch=outer_then, else_branch=branch("c"))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("r", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.ones((32, 32), np.float32), "w")])
    path = tmp_path / "m.onnx"
    onnx.save_model(helper.make_model(graph), str(path), save_as_external_data=True, location="m.data", size_threshold=0)
    model = onnx.load(str(path), load_external_data=False)
    expected = [entry.value for tensor in external_data_helper._get_all_tensors(model)
                for entry in tensor.external_data if entry.key == "location"]
    assert len(expected) == 4 and external_locations(path) == expected


def _hostile_tokenizer_json(source: Path, target: Path) -> Path:
    data = json.loads(source.read_text(encoding="utf-8"))
    split = {"type": "Split", "pattern": {"Regex": HOSTILE_REGEX}, "behavior": "Isolated", "invert": False}
    data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [split, data["pre_tokenizer"]]}
    target.write_text(json.dumps(data), encoding="utf-8")
    return target


class TestHostileTokenizer:
    def test_the_regex_really_panics_the_rust_library(self, tiny_bundle: Path, tmp_path: Path) -> None:
        tokenizer = Tokenizer.from_file(str(_hostile_tokenizer_json(tiny_bundle / "tokenizer.json", tmp_path / "t.json")))
        with pytest.raises(BaseException) as caught:
            tokenizer.encode(PANIC_TEXT)
        assert type(caught.value).__name__ == "PanicException" and not isinstance(caught.value, Exception)

    def test_load_bundle_refuses_it_in_one_line(self, bundle_copy: Path, capfd: pytest.CaptureFixture) -> None:
        _hostile_tokenizer_json(bundle_copy / "tokenizer.json", bundle_copy / "tokenizer.json")
        _relist(bundle_copy, "tokenizer.json")
        with pytest.raises(er.BundleError, match=r"tokenizer.json: the tokenizer fails on ordinary text") as caught:
            er.load_bundle(bundle_copy)
        assert "\n" not in str(caught.value) and "retry-limit" in str(caught.value) and caught.value.hint
        assert "panicked" not in capfd.readouterr().err  # Rust's panic report is kept off the terminal

    def test_a_panic_at_a_request_is_a_bundle_error(self, tiny_bundle: Path, tmp_path: Path) -> None:
        path = _hostile_tokenizer_json(tiny_bundle / "tokenizer.json", tmp_path / "tokenizer.json")
        tokenizer = BundleTokenizer(Tokenizer.from_file(str(path)), path)  # past the probe
        with pytest.raises(er.BundleError, match=r"tokenizer.json: the tokenizer failed \(Onig"):
            tokenizer.encode(PANIC_TEXT)
        assert tokenizer.decode(tokenizer.encode("hello", add_special_tokens=False)) == "hello"  # still usable

    def test_an_invalid_regex_is_refused_by_name(self, tiny_bundle: Path, tmp_path: Path) -> None:
        path = tmp_path / "tokenizer.json"
        data = json.loads((tiny_bundle / "tokenizer.json").read_text(encoding="utf-8"))
        data["pre_tokenizer"] = {"type": "Split", "pattern": {"Regex": "(unclosed"}, "behavior": "Isolated", "invert": False}
        path.write_text(json.dumps(data), encoding="utf-8")
        with pytest.raises(er.BundleError, match=f"{re.escape(str(path))}: not a readable tokenizer.json"):
            BundleTokenizer.from_file(path)


def test_no_traceback_from_the_cli_on_a_hostile_tokenizer(bundle_copy: Path) -> None:
    _hostile_tokenizer_json(bundle_copy / "tokenizer.json", bundle_copy / "tokenizer.json")
    _relist(bundle_copy, "tokenizer.json")
    result = CliRunner().invoke(app, ["generate", str(bundle_copy), "hello", "--max-new-tokens", "1"])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "tokenizer.json: the tokenizer fails on ordinary text" in result.output
