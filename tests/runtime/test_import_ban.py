"""The lint (ruff, `make lint`) bans the runtime from importing the compiler or its heavy
dependencies: runtime/pyproject.toml's TID251 banned-api. ruff is in the test extras."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUNTIME_FILE = "runtime/edgelm_runtime/_lint_probe.py"  # never written: ruff reads the code from stdin
BANNED = ("import torch", "import torch.nn as nn", "from transformers import AutoModel", "import onnx",
          "from onnx import helper", "import edgelm", "from edgelm.stages.export.decoder import decoder", "import pydantic",
          "import peft", "import onnxscript", "import typer", "from rich.console import Console",
          "import onnxruntime.transformers.optimizer", "def lazy():\n    import torch\n")


def ruff(code: str, filename: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--stdin-filename", filename, "-"],
                          input=code, capture_output=True, text=True, cwd=ROOT)


@pytest.mark.parametrize("code", BANNED)
def test_runtime_file_with_a_banned_import_fails_the_lint(code: str) -> None:
    result = ruff(code + "\n", RUNTIME_FILE)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "TID251" in result.stdout


def test_runtime_may_import_its_own_dependencies() -> None:
    code = "import json\n\nimport jinja2\nimport numpy as np\nimport onnxruntime as ort\nimport tokenizers\n" \
           "from edgelm_runtime.bundle import Manifest\n"
    result = ruff(code, RUNTIME_FILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_ban_is_the_runtime_s_only() -> None:
    result = ruff("import torch\nimport onnx\nimport edgelm\n", "edgelm/_lint_probe.py")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_runtime_passes_the_lint() -> None:
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "runtime"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
