"""Runtime LoRA adapters: one base bundle, adapters switched per request by name.

The manifest's `runtime_adapters` name onnxruntime adapter files (adapters/NAME.onnx_adapter)
whose tensors feed the graph's optional LoRA inputs (empty by default: no adapter is the base).
Each file is checked (inside the bundle folder, its sha256) and loaded the first time its name is
used, then kept: switching is a dictionary lookup.

onnxruntime 1.32 applies `RunOptions.add_active_adapter` in `InferenceSession.run`, but silently
not in `run_with_iobinding` (measured: the base model's outputs). So an adapter is used both ways:
its RunOptions for plain runs, and its tensors bound as inputs of every IO binding (the steppers
generation runs on)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from edgelm_runtime.bundle import MANIFEST_FILE, Manifest, resolve_inside, sha256_file
from edgelm_runtime.errors import BundleError, GenerationError
from edgelm_runtime.session import DecoderSession


@dataclass(frozen=True)
class LoadedAdapter:
    name: str
    run_options: ort.RunOptions               # with the adapter active: InferenceSession.run
    parameters: dict[str, ort.OrtValue]       # the same tensors by input name: IO bindings
    # RunOptions keeps only a pointer to its active adapter: the adapter must live as long as it
    # (measured: once the LoraAdapter is collected, runs silently compute the base model)
    lora: ort.LoraAdapter


class BundleAdapters:
    """The adapters of one bundle, loaded lazily, each once (thread-safe)."""

    def __init__(self, folder: Path, manifest: Manifest) -> None:
        self._folder = Path(folder)
        self._entries = {entry.name: entry for entry in manifest.runtime_adapters}
        self._loaded: dict[str, LoadedAdapter] = {}
        self._views: dict[str, Any] = {}
        self._lock = threading.RLock()

    @property
    def names(self) -> list[str]:
        return list(self._entries)

    def check(self, name: str) -> str:
        """`name` if the bundle has an adapter of that name, else a one-line error listing them."""
        if name not in self._entries:
            known = ", ".join(self._entries) or "none (this bundle was built without --adapter-mode runtime)"
            raise GenerationError(f"no adapter {name!r} in {self._folder.name} (adapters: {known})",
                                  hint="pass one of the bundle's adapter names, or none for the base model")
        return name

    def load(self, name: str) -> LoadedAdapter:
        with self._lock:
            found = self._loaded.get(self.check(name))
            if found is None:
                found = self._loaded[name] = self._read(name)
            return found

    def view(self, name: str, decoder: Any, make: Callable[[str, AdapterDecoder], Any]) -> Any:
        """The model view for `name`, made once by `make(name, decoder with the adapter active)`."""
        with self._lock:
            found = self._views.get(self.check(name))
            if found is None:
                found = self._views[name] = make(name, adapter_decoder(decoder, self, name))
            return found

    def run_options(self, name: str) -> ort.RunOptions:
        """RunOptions with the adapter `name` active (one object per name, kept)."""
        return self.load(name).run_options

    def _read(self, name: str) -> LoadedAdapter:
        entry = self._entries[name]
        index = list(self._entries).index(name)
        path = resolve_inside(self._folder, entry.file, f"runtime_adapters.{index}.file")
        if not path.is_file():
            raise BundleError(f"{self._folder}: {entry.file} (adapter {name!r}) is missing",
                              hint="copy the whole bundle folder, or rebuild it")
        if sha256_file(path) != entry.sha256:
            raise BundleError(f"{self._folder}: {entry.file} (adapter {name!r}) sha256 does not match {MANIFEST_FILE}",
                              hint="the file is corrupt or was replaced; copy the bundle again")
        try:
            adapter = ort.LoraAdapter()
            adapter.Load(str(path))
            parameters = ort.AdapterFormat.read_adapter(str(path)).get_parameters()
        except Exception as exc:  # onnxruntime's pybind errors derive from Exception only
            raise BundleError(f"{path}: onnxruntime could not read the adapter ({str(exc).splitlines()[0][:200]})",
                              hint="the file is corrupt; copy the bundle again, or rebuild it") from None
        options = ort.RunOptions()
        options.add_active_adapter(adapter)
        return LoadedAdapter(name=name, run_options=options, parameters=dict(parameters), lora=adapter)


class AdapterDecoder(DecoderSession):
    """The bundle's decoder session (shared, not copied) with one adapter active in every run."""

    def __init__(self, base: DecoderSession, adapter: LoadedAdapter) -> None:  # a view: no new session
        self.__dict__.update(base.__dict__)
        self.adapter = adapter

    def run(self, input_ids: np.ndarray, past: list[np.ndarray] | None = None, last_only: bool = False,
            run_options: ort.RunOptions | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        return super().run(input_ids, past, last_only, run_options or self.adapter.run_options)

    @property
    def bound_inputs(self) -> dict[str, ort.OrtValue]:
        return self.adapter.parameters  # IO binding ignores the RunOptions' adapter: its steppers bind these


def adapter_decoder(decoder: Any, adapters: BundleAdapters, name: str) -> AdapterDecoder:
    """`decoder` with the adapter `name` active; a one-line error for an unknown name."""
    loaded = adapters.load(name)
    if not isinstance(decoder, DecoderSession):
        raise BundleError(f"adapter {name!r}: runtime adapters need the dynamic decoder graph",
                          hint="this bundle's fixed-shape graphs cannot take them; rebuild with merged adapters")
    return AdapterDecoder(decoder, loaded)
