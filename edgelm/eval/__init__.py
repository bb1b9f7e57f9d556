"""Quality measurement shared by the build's quality check and `edgelm eval`."""
