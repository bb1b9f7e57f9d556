"""CI's bounded fuzz run (fixed seed): damaged bundles end in BundleError / TemplateError or work,
never another exception, a crash or a hang. The fuzzer runs in its own process, so a crash inside
onnxruntime or tokenizers fails this test (naming the last case) instead of killing pytest."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

FUZZER = Path(__file__).with_name("fuzz_bundles.py")


def test_damaged_bundles_only_raise_edgelm_errors(tiny_bundle):
    result = subprocess.run([sys.executable, str(FUZZER), str(tiny_bundle), "--cases", "120", "--seed", "0"],
                            capture_output=True, text=True, timeout=600)
    last_case = [line for line in result.stdout.splitlines() if line.startswith("case ")][-1:]
    assert result.returncode == 0, f"last case: {last_case}\n{result.stderr[-4000:]}"
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["cases"] == 120 and summary["failures"] == 0
    # GenerationError only for a use the damage made impossible (a prompt longer than a context shrunk to 1)
    assert set(summary["outcomes"]) <= {"used", "BundleError", "TemplateError", "RenderLimitError", "GenerationError"}
    assert summary["outcomes"].get("BundleError", 0) > 30 and summary["outcomes"].get("TemplateError", 0) > 5
    assert summary["slowest_case_s"] < 20
