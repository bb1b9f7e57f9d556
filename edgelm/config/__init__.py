"""Typed, frozen configuration: device profiles (where it runs), recipes (what to build) and the
resolved BuildPlan that the pipeline executes and the manifest records."""

from edgelm.config.plan import BuildOverrides, BuildPlan, resolve
from edgelm.config.profile import DeviceProfile, list_profiles, load_profile
from edgelm.config.recipe import Recipe, load_recipe

__all__ = ["BuildOverrides", "BuildPlan", "DeviceProfile", "Recipe", "list_profiles", "load_profile", "load_recipe", "resolve"]
