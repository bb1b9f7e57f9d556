"""edgelm: compile small causal LMs into fused, quantized ONNX bundles for edge devices.

The public names load on first use (PEP 562), so `import edgelm` (and the `edgelm` command's
launcher) is instant; `from edgelm import build` works as before."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "edgelm.api": ("PHASES", "PIPELINE", "BuildReport", "EvalReport", "build", "evaluate", "plan_build"),
    "edgelm.config": ("BuildOverrides", "BuildPlan", "DeviceProfile", "Recipe", "list_profiles", "load_profile", "load_recipe", "resolve"),
    "edgelm.errors": ("AdapterError", "BundleExistsError", "ConfigError", "EdgelmError", "ModelLoadError",
                      "QualityGateError", "StageError"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'edgelm' has no attribute {name!r}")
