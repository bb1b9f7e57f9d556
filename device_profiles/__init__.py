"""Built-in device profiles (YAML data, shipped in the wheel as edgelm.device_profiles)."""
