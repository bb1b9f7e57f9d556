"""The build stages, one module or folder per phase of edgelm.api.PHASES (preflight, load, adapt,
compress, export, optimize, quantize, check, package)."""
