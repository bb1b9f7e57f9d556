"""edgelm bench: the stable JSON schema, interleaved ratios, the table and the chart."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edgelm_runtime.bench import bench
from edgelm_runtime.errors import BundleError, GenerationError


def test_bench_reports_the_schema_for_each_bundle(tiny_bundle):
    result = bench([tiny_bundle, tiny_bundle], threads=1, repeats=2, warmup=0, decode_tokens=8)
    first, second = result["bundles"]
    for row in (first, second):
        assert {"name", "decode_tokens_per_s", "prefill_tokens_per_s", "ttft_ms", "peak_rss_mb", "load_s",
                "size_mb"} <= set(row)
        assert set(row["ttft_ms"]) == {"32", "128"}  # 512 + 8 does not fit the tiny bundle's 256 positions
        assert row["decode_tokens_per_s"] > 0 and row["peak_rss_mb"] > 10 and 0 < row["load_s"] < 60
        decode = row["detail"]["decode_tokens_per_s"]
        assert decode["min"] <= decode["median"] <= decode["max"]
        assert row["detail"]["decode_model_tokens_per_s"]["median"] >= decode["median"]  # end-to-end adds work
        assert row["size_mb"] > 0.1 and row["ttft_ms"]["128"] > 0
        grammar = row["detail"]["grammar_us"]  # the JSON-schema mask per token, measured, not assumed
        assert 0 < grammar["min"] <= grammar["median"] < 1e5
    assert first["decode_ratio_vs_first"] == 1.0
    assert result["settings"]["repeats"] == 2 and result["settings"]["decode_tokens"] == 8


def test_bench_rejects_bad_settings_and_bundles(tiny_bundle, tmp_path):
    with pytest.raises(GenerationError, match="repeats 0"):
        bench([tiny_bundle], repeats=0)
    with pytest.raises(BundleError):
        bench([tmp_path])


def test_cli_bench_json_and_plot(tiny_bundle, tmp_path):
    chart = tmp_path / "bench.png"
    result = subprocess.run([sys.executable, "-m", "edgelm.cli", "bench", str(tiny_bundle), "--threads", "1",
                             "--repeats", "1", "--warmup", "0", "--decode-tokens", "4", "--json", "--plot", str(chart)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["bundles"][0]["name"] == tiny_bundle.name
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_bench_table(tiny_bundle):
    result = subprocess.run([sys.executable, "-m", "edgelm.cli", "bench", str(tiny_bundle), "--threads", "1",
                             "--repeats", "1", "--warmup", "0", "--decode-tokens", "4"],
                            capture_output=True, text=True, timeout=300, env={"COLUMNS": "200", **__import__("os").environ})
    assert result.returncode == 0, result.stderr
    assert "edgelm bench" in result.stdout and "x1.00" in result.stdout


def test_cli_bench_table_with_bundles_of_different_windows(tiny_bundle, tiny_static_bundles):
    """A static NPU bundle's window (128 here) holds fewer TTFT prompt lengths than a dynamic one:
    the table shows "-" for the lengths a bundle could not measure, not a traceback."""
    result = subprocess.run([sys.executable, "-m", "edgelm.cli", "bench", str(tiny_bundle), str(tiny_static_bundles["fp32"]),
                             "--provider", "CPUExecutionProvider", "--threads", "1", "--repeats", "1", "--warmup", "0",
                             "--decode-tokens", "4"],
                            capture_output=True, text=True, timeout=300, env={"COLUMNS": "200", **__import__("os").environ})
    assert result.returncode == 0, result.stderr
    static_row = next(line for line in result.stdout.splitlines()
                      if tiny_static_bundles["fp32"].name in line and "│" in line)  # the table, not the progress
    assert "/-" in static_row
