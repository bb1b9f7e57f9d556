"""`edgelm serve`: check the options, load the bundle(s), run edgelm_runtime's server.

Torch-free (edgelm_runtime only), like the command itself. A decoder bundle serves chat and
completions, an encoder bundle its task's endpoint; `--embeddings` adds an embedding bundle's
/v1/embeddings beside the first."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def start_server(bundle: Path, host: str, port: int, queue: int, threads: int | None, provider: str | None,
                 api_key: str | None, console: Any, embeddings: Path | None = None, parallel: int = 1,
                 kv_cache_mb: float = 256) -> None:
    import edgelm_runtime as er

    try:
        from edgelm_runtime.encoder_server import check_embeddings
        from edgelm_runtime.server import endpoints, serve
    except ImportError:
        raise er.GenerationError("edgelm serve needs starlette and uvicorn",
                                 hint="pip install 'edgelm-runtime[server]'") from None
    if queue < 0:
        raise er.GenerationError(f"--queue {queue}: must be 0 or more", hint="e.g. --queue 8")
    if not 1 <= parallel <= 64:
        raise er.GenerationError(f"--parallel {parallel}: must be 1 to 64", hint="e.g. --parallel 4")
    if not 0 <= kv_cache_mb <= 65536:
        raise er.GenerationError(f"--kv-cache-mb {kv_cache_mb}: must be 0 to 65536 (0 turns prefix reuse off)",
                                 hint="e.g. --kv-cache-mb 256")
    if api_key is None and os.environ.get("EDGELM_API_KEY") is not None:  # click reads EDGELM_API_KEY="" as unset
        api_key = os.environ["EDGELM_API_KEY"]
    if api_key is not None and not api_key.strip():  # "" must not mean "no authentication"
        raise er.GenerationError("--api-key (or EDGELM_API_KEY) is empty: that would serve without authentication",
                                 hint="pass a non-empty key, or unset both to serve without one on 127.0.0.1")
    model = er.load_bundle(bundle, threads=threads, provider=provider, kv_cache_mb=kv_cache_mb)
    extra = None
    if embeddings is not None:
        extra = check_embeddings(model, er.load_bundle(embeddings, threads=threads, provider=provider))
    served = [model] if extra is None else [model, extra]
    what = " and ".join(f"{m.manifest.name} ({', '.join(endpoints(m))})" for m in served)
    console.print(f"serving {what} on http://{host}:{port}/v1 (Ctrl-C stops)")
    serve(model, host, port, queue, api_key, embeddings=extra, parallel=parallel)
