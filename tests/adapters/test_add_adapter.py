"""`edgelm build --from-bundle B --add-adapter NEW -o OUT`, adapter names and their one-line errors."""

from __future__ import annotations

import numpy as np
import pytest

import edgelm_runtime as er
from edgelm.config.recipe import Recipe, parse_adapter
from tests.adapters.test_runtime_adapters import _ids
from tests.integration.test_cli import _assert_clean_error, _run
from tests.integration.test_cli_adapters import _other_base
from tests.stages.test_adapters import make_adapter


def test_add_adapter_without_rebuilding(runtime_bundles, merged_bundles, tiny_adapters, tmp_path):
    source = runtime_bundles["cpu-fp32"]
    out = tmp_path / "more"
    result = _run("build", "--from-bundle", str(source), "--add-adapter", f"{tiny_adapters['tone']}@tone2", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert "adapter tone2 added" in result.output
    manifest = er.verify_bundle(out, check_hashes=True)
    assert [a.name for a in manifest.runtime_adapters] == ["sentiment", "tone", "tone2"]
    assert (out / "model.onnx.data").read_bytes() == (source / "model.onnx.data").read_bytes()  # base unchanged
    assert manifest.plan["adapters"][-1]["name"] == "tone2" and manifest.plan["adapters"][-1]["mode"] == "runtime"
    added = manifest.runtime_adapters[-1]
    assert added.quality["perplexity_ratio"] == pytest.approx(1.0, abs=1e-3) and added.quality["top1_agreement"] == 1.0
    llm, merged = er.load_bundle(out), er.load_bundle(merged_bundles["tone"])
    ids = _ids(merged)
    assert np.abs(llm.logits(ids, adapter="tone2") - merged.logits(ids)).max() < 1e-4
    # the same again: the output exists (no --force), the name is taken
    _assert_clean_error(_run("build", "--from-bundle", str(source), "--add-adapter", str(tiny_adapters["tone"]),
                             "-o", str(tmp_path / "again")), "already has an adapter named 'tone'", "PATH@NAME")
    _assert_clean_error(_run("build", "--from-bundle", str(source), "--add-adapter", f"{tiny_adapters['tone']}@x",
                             "-o", str(out)), "output already exists", "--force")


def test_add_adapter_refuses_a_mismatch(runtime_bundles, tiny_model_dir, tmp_path):
    source = runtime_bundles["cpu-fp32"]
    untargeted = make_adapter(tiny_model_dir, tmp_path / "gate", targets=("gate_proj",))
    wide = make_adapter(_other_base(tmp_path / "wide", hidden_size=32, intermediate_size=64), tmp_path / "wide-lora",
                        targets=("q_proj",))
    other = make_adapter(tiny_model_dir, tmp_path / "lm", targets=("lm_head",))
    for path, fragments in ((wide, ["has shape", "cannot take", "another base"]),
                            (other, ["targets lm_head", "has no adapter inputs for"])):
        out = tmp_path / f"out-{path.name}"
        _assert_clean_error(_run("build", "--from-bundle", str(source), "--add-adapter", str(path), "-o", str(out)),
                            str(path), *fragments)
        assert not out.exists()
    assert untargeted.is_dir()
    _assert_clean_error(_run("build", "--add-adapter", str(untargeted), "-o", str(tmp_path / "x")), "needs --from-bundle")


def test_add_adapter_to_a_merged_bundle(tiny_bundle, tiny_adapters, tmp_path):
    _assert_clean_error(_run("build", "--from-bundle", str(tiny_bundle), "--add-adapter", str(tiny_adapters["tone"]),
                             "-o", str(tmp_path / "out")), "has no runtime adapter inputs", "--adapter-mode runtime")


def test_adapter_spellings():
    assert parse_adapter("a/sentiment") == {"path": "a/sentiment"}
    assert parse_adapter("a/b:0.5") == {"path": "a/b", "weight": 0.5}
    assert parse_adapter("a/b@tone") == {"path": "a/b", "name": "tone"}
    assert parse_adapter("a/b:0.5@tone") == {"path": "a/b", "weight": 0.5, "name": "tone"}
    assert parse_adapter("runs/v1@2/adapter") == {"path": "runs/v1@2/adapter"}  # "@" inside a path stays
    recipe = Recipe(adapters=["x/sentiment", "y/other@tone"], adapter_mode="runtime")
    assert [(a.adapter_name, a.mode) for a in recipe.adapters] == [("sentiment", "runtime"), ("tone", "runtime")]
    assert Recipe(adapters=[{"path": "x/a", "mode": "merge"}], adapter_mode="runtime").adapters[0].mode == "merge"


def test_duplicate_and_bad_names(tiny_model_dir, tiny_recipe, tiny_adapters, tmp_path):
    tone = str(tiny_adapters["tone"])
    out = tmp_path / "out"
    base = ["build", "--profile", "cpu-fp32", "--model", str(tiny_model_dir), "--recipe", str(tiny_recipe), "-o", str(out)]
    _assert_clean_error(_run(*base, "--adapter", tone, "--adapter", f"{tiny_adapters['sentiment']}@tone",
                             "--adapter-mode", "runtime"), "adapters.1.name: duplicate adapter name 'tone'", "PATH@NAME")
    _assert_clean_error(_run(*base, "--adapter", f"{tone}@bad name", "--adapter-mode", "runtime"),
                        "adapters.0.name", "is not an adapter name")
    _assert_clean_error(_run(*base, "--adapter", tone, "--adapter-mode", "sideways"), "--adapter-mode: expected merge or runtime")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"adapter_mode: runtime\nadapters: [{tone}, {tone}]\n")
    _assert_clean_error(_run("build", "--profile", "cpu-fp32", "--model", str(tiny_model_dir), "--recipe", str(recipe),
                             "-o", str(out)), "r.yaml", "duplicate adapter name 'tone'")
    assert not out.exists()


def test_runtime_mode_refusals(tiny_model_dir, tiny_recipe, tiny_adapters, tmp_path):
    out = tmp_path / "out"
    args = ["build", "--model", str(tiny_model_dir), "--recipe", str(tiny_recipe), "-o", str(out),
            "--adapter", str(tiny_adapters["tone"]), "--adapter-mode", "runtime"]
    _assert_clean_error(_run(*args, "--profile", "gpu-fp16"), "float16", "adapter_mode merge")
    _assert_clean_error(_run(*args, "--profile", "cpu-fp32", "--prune-mlp", "0.25"), "prune", "adapter_mode merge")
    dora = make_adapter(tiny_model_dir, tmp_path / "dora", use_dora=True)
    _assert_clean_error(_run("build", "--profile", "cpu-fp32", "--model", str(tiny_model_dir), "--recipe", str(tiny_recipe),
                             "-o", str(out), "--adapter", str(dora), "--adapter-mode", "runtime"),
                        "cannot be kept for run time: a DoRA adapter", "adapter_mode merge")
    assert not out.exists()
