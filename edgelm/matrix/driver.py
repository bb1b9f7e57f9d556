"""`edgelm matrix`: run a matrix file's cells as Ray tasks, on a local Ray instance or a cluster.

Ray schedules; edgelm only says what each task needs. A build holds `resources.cpus` and the
memory its model's size calls for (edgelm/matrix/resources.py); a bench holds its device's
resource and all the CPUs of the node it runs on, so nothing runs beside a timing. Each step's
record comes back through Ray and OUT/matrix.json is rewritten (atomically) after every one, so
Ctrl-C, a crash or a lost driver keep what finished, and the next run with the same file reuses
every cell whose hash is unchanged."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from edgelm.config.matrix import MatrixSpec, load_matrix
from edgelm.errors import ConfigError
from edgelm.matrix.cells import BUNDLES, Cell, expand_cells
from edgelm.matrix.report import RESULTS, cell_status, finish, read_results, write_results

logger = logging.getLogger(__name__)
Progress = Callable[[dict[str, Any]], None]
_STATE = ".matrix"          # OUT/.matrix: attempt counters of build tasks
_OBJECT_STORE = 200 * 2**20  # records are small: a local instance needs no 30%-of-RAM object store


def run_matrix(path: str | Path, output: str | Path, *, address: str | None = None, parallel: int | None = None,
               progress: Progress | None = None) -> dict[str, Any]:
    """Run every step of every cell that has no up-to-date result in `output`; returns matrix.json's data."""
    spec, output = load_matrix(path), Path(output).absolute()
    _check_output(output)
    if parallel is not None and parallel < 1:
        raise ConfigError(f"--parallel {parallel}: needs at least 1", hint="e.g. --parallel 2, or leave it out")
    ray = _import_ray()
    cells = expand_cells(spec, str(path), output)
    with ray_session(ray, address) as cluster:
        from edgelm.pipeline.workspace import clean_stale

        run = _Run(ray, spec, cells, read_results(output), output, cluster, parallel, progress)  # checks first
        run.results["file"] = str(Path(path).resolve())
        (output / BUNDLES).mkdir(parents=True, exist_ok=True)
        clean_stale(output / BUNDLES)  # what a killed worker left, now its process is gone
        try:
            run.loop()
        except KeyboardInterrupt:
            run.interrupt()
            raise
        return run.results


@contextmanager
def ray_session(ray: Any, address: str | None) -> Iterator[dict[str, Any]]:
    """Connect to `address` (or RAY_ADDRESS), or start a local Ray instance on this machine."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    options: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": False}
    if address is None:
        options.update(address="local", include_dashboard=False, object_store_memory=_OBJECT_STORE)
    else:
        options["address"] = address
    # Ray says at every start that token authentication is on (its safe default; docs/matrix.md)
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    try:
        context = ray.init(**options)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"Ray cluster {address or 'local'}: {str(exc).splitlines()[0] if str(exc) else exc!r}",
                          hint="start it with `ray start --head` (docs/matrix.md) and check --address/RAY_ADDRESS; "
                               "a cluster with token authentication needs RAY_AUTH_MODE=token and its token here too "
                               "(RAY_AUTH_TOKEN or ~/.ray/auth_token); or leave both out for a local instance") from None
    try:
        nodes = [{"id": node["NodeID"], "address": node.get("NodeManagerAddress"),
                  "resources": {key: value for key, value in node["Resources"].items() if not key.startswith("node:")}}
                 for node in ray.nodes() if node.get("Alive")]
        yield {"address": address or "local", "dashboard": getattr(context, "dashboard_url", None) or None,
               "nodes": nodes}
    finally:
        ray.shutdown()


class _Run:
    """One run's submissions and records; matrix.json after every step that finishes."""

    def __init__(self, ray: Any, spec: MatrixSpec, cells: list[Cell], previous: dict[str, dict[str, Any]],
                 output: Path, cluster: dict[str, Any], parallel: int | None, progress: Progress | None) -> None:
        from edgelm.matrix import tasks

        self.ray, self.spec, self.cells, self.output, self.parallel = ray, spec, cells, output, parallel
        self.progress = progress or (lambda results: None)
        # max_calls=1: a build runs in a fresh worker process, so its peak RSS is its own and the
        # memory torch keeps goes back to the node when it ends
        self.remote = {name: ray.remote(max_calls=1 if name == "build" else 0)(getattr(tasks, f"{name}_cell"))
                       for name in ("build", "eval", "bench")}
        self.started = time.monotonic()
        self.results: dict[str, Any] = {
            "matrix": spec.name, "file": None,
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "run": list(spec.run),
            "gates": spec.gates.model_dump(exclude_none=True), "ray": cluster, "devices": [d.name for d in spec.bench.devices],
            "cells": [self._carried(cell, previous.get(cell.hash)) for cell in cells]}
        self.pending: dict[Any, tuple[int, str, str | None]] = {}
        self.queue = [index for index, record in enumerate(self.results["cells"]) if "build" not in record]
        self.bench_cpus = {device.name: self._bench_cpus(device.resource) for device in spec.bench.devices
                           if "bench" in spec.run}
        self._check_memory()
        for index, record in enumerate(self.results["cells"]):
            if "build" in record:  # reused: only the steps it lacks
                self._submit_after(index, record["build"])

    def _carried(self, cell: Cell, old: dict[str, Any] | None) -> dict[str, Any]:
        """The cell's record, keeping an earlier run's results that are still valid for this hash."""
        record = {**cell.record(), "reused": False, "bench": {}}
        if old and old.get("build", {}).get("status") == "done" and (cell.bundle / "manifest.json").is_file():
            record.update(reused=True, build=old["build"])
            if old.get("eval", {}).get("status") == "done":
                record["eval"] = old["eval"]
            record["bench"] = {name: result for name, result in old.get("bench", {}).items()
                               if result.get("status") == "done"}
        record["status"] = cell_status(record, self.spec.run, self._devices_for(cell))
        return record

    def _devices_for(self, cell: Cell) -> list[str]:
        if "bench" not in self.spec.run:
            return []
        return [device.name for device in self.spec.bench.devices if not device.profiles or cell.profile in device.profiles]

    def _payload(self, index: int) -> dict[str, Any]:
        cell = self.cells[index]
        return {"plan": cell.plan.summary(), "bundle": str(cell.bundle), "cell": cell.id,
                "attempts": str(self.output / _STATE / f"{cell.hash}.build-attempts"),
                "eval": self.spec.eval.model_dump(mode="json"), "bench": self.spec.bench.model_dump(mode="json")}

    def _submit_build(self, index: int) -> None:
        cell = self.cells[index]
        options = {"num_cpus": self.spec.resources.cpus, "memory": cell.memory_bytes,
                   "max_retries": self.spec.resources.retries, "retry_exceptions": False,
                   "name": f"build {cell.id}"}
        ref = self.remote["build"].options(**options).remote(self._payload(index))
        self.pending[ref] = (index, "build", None)
        self.results["cells"][index]["status"] = "submitted"  # in Ray: waiting for a node, or building
        self._submit_after(index, ref)

    def _submit_after(self, index: int, build: Any) -> None:
        """eval and bench of a cell, each waiting in Ray for its build (a record, or the build's ref)."""
        record, cell, payload = self.results["cells"][index], self.cells[index], self._payload(index)
        if "eval" in self.spec.run and "eval" not in record:
            ref = self.remote["eval"].options(num_cpus=self.spec.resources.cpus, max_retries=1,
                                              name=f"eval {cell.id}").remote(payload, build)
            self.pending[ref] = (index, "eval", None)
        for device in self.spec.bench.devices:
            if device.name in self._devices_for(cell) and device.name not in record["bench"]:
                resources = {device.resource: 1} if device.resource else {}
                ref = self.remote["bench"].options(num_cpus=self.bench_cpus[device.name], resources=resources,
                                                   max_retries=1, name=f"bench {cell.id} on {device.name}"
                                                   ).remote(payload, build, device.name)
                self.pending[ref] = (index, "bench", device.name)

    def _bench_cpus(self, resource: str | None) -> float:
        if self.spec.bench.cpus is not None:
            return self.spec.bench.cpus
        nodes = [node for node in self.results["ray"]["nodes"] if resource is None or resource in node["resources"]]
        if not nodes:
            raise ConfigError(f"bench.devices: no node of the Ray cluster has the resource {resource!r}",
                              hint=f"start the device's node with ray start --resources '{{\"{resource}\": 1}}' "
                                   "(docs/matrix.md)")
        # a device node started with --num-cpus=0 takes no builds; its bench then holds only the device
        return min(node["resources"].get("CPU", 0) for node in nodes)

    def _check_memory(self) -> None:
        """A build no node can hold would wait in Ray forever: refuse it now, with the numbers."""
        largest = max((node["resources"].get("memory", 0) for node in self.results["ray"]["nodes"]), default=0)
        for index in self.queue:
            cell = self.cells[index]
            if cell.memory_bytes > largest:
                raise ConfigError(f"cell {cell.id}: its build needs {cell.memory_bytes / 2**30:.1f} GiB and the largest "
                                  f"Ray node has {largest / 2**30:.1f} GiB for tasks",
                                  hint="add a node with more memory, or set resources.memory_gb in the matrix file "
                                       "if the estimate (docs/matrix.md) is too high for this model")

    def loop(self) -> None:
        self._save()
        while self.queue or self.pending:
            building = sum(1 for _, step, _ in self.pending.values() if step == "build")
            submitted = False
            while self.queue and (self.parallel is None or building < self.parallel):
                self._submit_build(self.queue.pop(0))
                building, submitted = building + 1, True
            ready, _ = self.ray.wait(list(self.pending), num_returns=1, timeout=1.0)
            for ref in ready:
                index, step, device = self.pending.pop(ref)
                self._store(index, step, device, self._get(ref))
            if ready or submitted:
                self._save()
            self.progress(self.results)
        self.results.update(finish(self.results, self.spec, time.monotonic() - self.started))
        self._save()

    def _get(self, ref: Any) -> dict[str, Any]:
        from edgelm.matrix.tasks import one_line

        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayError as exc:  # the worker died more often than the retries allow
            cause = exc.cause if getattr(exc, "cause", None) is not None else exc
            return {"status": "failed", "error": f"lost by Ray after {self.spec.resources.retries} retries: {one_line(cause)}"}

    def _store(self, index: int, step: str, device: str | None, result: dict[str, Any]) -> None:
        record = self.results["cells"][index]
        if step == "bench":
            record["bench"][device] = result
        else:
            record[step] = result
        record["status"] = cell_status(record, self.spec.run, self._devices_for(self.cells[index]))

    def interrupt(self) -> None:
        """Ctrl-C: cancel every task (their workspaces go with their processes) and keep what finished."""
        for ref in self.pending:
            self.ray.cancel(ref, force=True)
        for record in self.results["cells"]:
            if record["status"] not in ("done", "failed"):
                record["status"] = "interrupted"
        self.results["interrupted"] = True
        self._save()

    def _save(self) -> None:
        write_results(self.output, self.results)


def _check_output(output: Path) -> None:
    if output.exists() and not output.is_dir():
        raise ConfigError(f"{output}: is a file", hint="choose a folder for -o")
    if output.is_dir() and any(output.iterdir()) and not (output / RESULTS).is_file():
        raise ConfigError(f"{output}: exists and holds no {RESULTS} (not a matrix output)",
                          hint="choose a new or empty folder for -o; a matrix reuses only its own folder")


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError("edgelm matrix runs on Ray, which is not installed",
                          hint="pip install 'edgelm[matrix]'") from None
    return ray
