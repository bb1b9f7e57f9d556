"""Matrix files: the cells they expand to, their hashes, and field-named errors (no Ray needed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgelm.config.matrix import load_matrix
from edgelm.errors import ConfigError
from edgelm.matrix.cells import expand_cells
from edgelm.matrix.report import best_per_device, cell_status, gate_misses, pareto_plot, summary_table
from tests.integration.test_cli import _assert_clean_error, _run


def _matrix(folder: Path, text: str) -> Path:
    path = folder / "m.yaml"
    path.write_text(text)
    return path


def _cells(path: Path, out: Path):
    return expand_cells(load_matrix(path), str(path), out)


def test_axes_expand_to_every_combination_with_resolved_plans(tmp_path, tiny_model_dir, tiny_recipe):
    path = _matrix(tmp_path, f"""
recipe: {tiny_recipe}
models: [{tiny_model_dir}]
profiles: [cpu-fp32, cpu-int4]
variants: {{prune.mlp_fraction: [0.0, 0.25], calibration.samples: [4, 6]}}
""")
    cells = _cells(path, tmp_path / "out")
    assert len(cells) == 2 * 2 * 2
    assert len({cell.hash for cell in cells}) == 8 and len({cell.bundle for cell in cells}) == 8
    cell = next(c for c in cells if c.profile == "cpu-int4" and c.variant == {"prune.mlp_fraction": 0.25,
                                                                                "calibration.samples": 4})
    assert cell.id == "tiny-llama/cpu-int4/prune.mlp_fraction=0.25,calibration.samples=4"
    assert cell.plan.prune.mlp_fraction == 0.25 and cell.plan.calibration.samples == 4
    assert cell.plan.profile.name == "cpu-int4" and cell.plan.max_seq_len == 256  # the recipe's
    assert cell.bundle.parent == tmp_path / "out" / "bundles" and cell.plan.name == cell.bundle.name
    assert cell.memory_bytes >= 2 * 2**30  # the libraries' share, even for a tiny model
    # the same file gives the same hashes; a changed source file changes every cell that reads it
    assert [c.hash for c in _cells(path, tmp_path / "out")] == [c.hash for c in cells]
    config = json.loads((tiny_model_dir / "config.json").read_text())
    copy = tmp_path / "copy"
    copy.mkdir()
    for item in tiny_model_dir.iterdir():
        (copy / item.name).write_bytes(item.read_bytes())
    (copy / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))
    changed = _cells(_matrix(tmp_path, path.read_text().replace(str(tiny_model_dir), str(copy))), tmp_path / "out")
    assert not {c.hash for c in changed} & {c.hash for c in cells}


def test_listed_variants_keep_their_names_and_relative_models(tmp_path, tiny_model_dir, tiny_recipe):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny").symlink_to(tiny_model_dir)
    path = _matrix(tmp_path, f"""
recipe: {tiny_recipe}
models: [models/tiny]
profiles: [cpu-w8a8]
variants: [{{name: dense}}, {{name: budget, accuracy_budget: 1.05}}]
""")
    dense, budget = _cells(path, tmp_path / "out")
    assert (dense.id, budget.id) == ("tiny-llama/cpu-w8a8/dense", "tiny-llama/cpu-w8a8/budget")
    assert budget.plan.quality.max_perplexity_ratio == 1.05
    assert budget.plan.profile.quantization.mixed_precision == "auto"
    assert dense.plan.model == str(tiny_model_dir.resolve())  # models/tiny, read from the matrix file's folder


@pytest.mark.parametrize("body, fragments", [
    ("models: [default]\nprofiles: [cpu-int9]\n", ["m.yaml: profiles[0]: unknown profile 'cpu-int9'"]),
    ("models: [default]\nprofiles: [cpu-int8]\nrun: [bench]\n", ["m.yaml: run: must include build"]),
    ("models: [default]\nprofiles: [cpu-int8]\nvariants: {prune.mlp_fracton: [0.1]}\n",
     ["m.yaml: variants (cell default/cpu-int8/prune.mlp_fracton=0.1): prune.mlp_fracton: unknown field"]),
    ("models: [default]\nprofiles: [cpu-int8]\nvariants: [{name: big, prune.mlp_fraction: 1.5}]\n",
     ["variants[0] (cell default/cpu-int8/big): prune.mlp_fraction:", "1.5"]),
    ("models: [default]\nprofiles: [cpu-int8]\ngates: {max_perplexity: 1.1}\n", ["m.yaml: gates.max_perplexity: unknown field"]),
    ("models: [default]\nprofiles: [cpu-int8]\nbench: {devices: [{name: pi5, profiles: [cpu-int4]}]}\n",
     ["bench.devices: pi5 names profiles the matrix does not build: ['cpu-int4']"]),
    ("models: [default]\nprofiles: [cpu-int8]\ngates: {max_accuracy_drop: 0.02}\n", ["needs eval in run"]),
    ("models: [nowhere/at-all]\nprofiles: [cpu-int8]\n", ["m.yaml: models[0]:"]),
    ("models: [default]\nprofiles: [cpu-int8]\nvariants: [{name: a, quality.max_kl_divergence: null}]\n",
     ["m.yaml: variants: quality.max_kl_divergence: null is not a value here"]),
    ("profiles: [cpu-int8]\n", ["m.yaml: models: Field required"]),
])
def test_bad_matrix_files_are_named_by_field(tmp_path, body, fragments):
    path = _matrix(tmp_path, body)
    result = _run("matrix", str(path), "-o", str(tmp_path / "out"))
    _assert_clean_error(result, *fragments)
    assert not (tmp_path / "out").exists()


def test_an_output_folder_that_is_not_a_matrix_is_refused(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    path = _matrix(tmp_path, "models: [default]\nprofiles: [cpu-int8]\n")
    _assert_clean_error(_run("matrix", str(path), "-o", str(tmp_path / "out")), "holds no matrix.json")
    _assert_clean_error(_run("matrix", "--report", str(tmp_path / "out")), "matrix.json: not found")
    _assert_clean_error(_run("matrix", str(path)), "needs a matrix file and -o OUT")


def _record(cell_id: str, size: float, ppl: float, decode: float | None, status: str = "done") -> dict:
    bench = {} if decode is None else {"pi5": {"status": "done", "decode_tokens_per_s": decode, "decode_min": decode - 1,
                                               "decode_max": decode + 1, "ttft_ms": {"128": 50.0}}}
    return {"id": cell_id, "bundle": f"/out/{cell_id}", "status": status, "bench": bench,
            "build": {"status": status, "size_mb": size, "perplexity_ratio": ppl, "top1_agreement": 0.95, "seconds": 60,
                      "peak_rss_mb": 4096}}


def test_the_gates_pick_the_fastest_passing_bundle_per_device(tmp_path):
    cells = [_record("a", 100, 1.02, 90.0), _record("b", 60, 1.30, 140.0), _record("c", 80, 1.04, 120.0),
             _record("d", 50, 1.01, None, status="failed")]
    gates = {"max_perplexity_ratio": 1.1}
    for record in cells:
        record["gate_misses"] = gate_misses({**record["build"]}, gates) if record["status"] == "done" else None
    assert cells[1]["gate_misses"] == ["perplexity_ratio 1.3 > 1.1"]
    results = {"matrix": "t", "devices": ["pi5"], "cells": cells}
    assert best_per_device(results, benched=True)["pi5"]["cell"] == "c"
    assert best_per_device(results, benched=False)["pi5"]["cell"] == "c"  # the smallest passing one
    assert gate_misses({"chat_identical": None}, {"min_chat_identical": 0.5}) == ["chat_identical not measured"]
    assert pareto_plot(results, tmp_path / "p.png").stat().st_size > 10_000
    assert summary_table(results).row_count == 4


def test_cell_status_follows_the_steps():
    run = ("build", "eval", "bench")
    assert cell_status({"bench": {}}, run, ["pi5"]) == "queued"
    assert cell_status({"bench": {}, "status": "submitted"}, run, ["pi5"]) == "submitted"
    assert cell_status({"build": {"status": "done"}, "bench": {}}, run, ["pi5"]) == "running"
    assert cell_status({"build": {"status": "done"}, "eval": {"status": "done"}, "bench": {"pi5": {"status": "done"}}},
                       run, ["pi5"]) == "done"
    assert cell_status({"build": {"status": "failed"}, "bench": {}}, run, ["pi5"]) == "failed"


def test_the_core_install_needs_no_ray(tmp_path):
    """`edgelm` imports no Ray, and without it `edgelm matrix` says which extra to install."""
    path = _matrix(tmp_path, "models: [default]\nprofiles: [cpu-int8]\n")
    probe = ("import sys; sys.modules['ray'] = None\n"  # `import ray` now raises ImportError, as when it is absent
             "import edgelm.cli\n"
             "sys.argv = ['edgelm', 'matrix', %r, '-o', %r]\n"
             "edgelm.cli.main()") % (str(path), str(tmp_path / "out"))
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "error: edgelm matrix runs on Ray, which is not installed" in result.stderr
    assert "pip install 'edgelm[matrix]'" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
    imports = subprocess.run([sys.executable, "-c", "import sys, edgelm.cli, edgelm.api; print('ray' in sys.modules)"],
                             capture_output=True, text=True, timeout=120)
    assert imports.stdout.strip() == "False", imports.stderr
