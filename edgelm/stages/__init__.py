"""One module per build stage. `PIPELINE` in edgelm.api lists them in order."""
