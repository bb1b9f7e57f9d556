"""Example recipes (YAML data, shipped in the wheel as edgelm.recipes)."""
