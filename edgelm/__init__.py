"""edgelm: compile small causal LMs into fused, quantized ONNX bundles for edge devices."""

from edgelm.api import PIPELINE, BuildReport, build, plan_build
from edgelm.config import BuildPlan, DeviceProfile, Recipe, list_profiles, load_profile, load_recipe, resolve
from edgelm.errors import BundleExistsError, ConfigError, EdgelmError, ModelLoadError, QualityGateError, StageError

__all__ = [
    "PIPELINE", "BuildPlan", "BuildReport", "BundleExistsError", "ConfigError", "DeviceProfile", "EdgelmError",
    "ModelLoadError", "QualityGateError", "Recipe", "StageError", "build", "list_profiles", "load_profile",
    "load_recipe", "plan_build", "resolve",
]
__version__ = "0.1.0"
