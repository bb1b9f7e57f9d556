"""Apps embed edgelm_runtime: importing it must not load the compiler's heavy dependencies."""

from __future__ import annotations

import subprocess
import sys

FORBIDDEN = ("torch", "transformers", "onnx", "pydantic", "edgelm")


def test_import_loads_no_compiler_dependencies() -> None:
    code = ("import sys, edgelm_runtime; "
            f"print(','.join(m for m in {FORBIDDEN!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "", f"importing edgelm_runtime loaded: {result.stdout.strip()}"


def test_public_api_is_explicit() -> None:
    import edgelm_runtime

    assert {"load_bundle", "LanguageModel", "Manifest", "FORMAT_VERSION", "read_manifest", "verify_bundle",
            "BundleError", "GenerationError", "TemplateError", "EdgelmRuntimeError",
            "GenerationStats"} <= set(edgelm_runtime.__all__)
    assert all(hasattr(edgelm_runtime, name) for name in edgelm_runtime.__all__)
