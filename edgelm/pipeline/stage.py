"""The Stage contract and the BuildState that stages read and extend.

A stage does one job and returns a typed result (edgelm/pipeline/results.py): the runner keeps it
in `state.results[stage.name]`; the manifest records it and the build summary words it. A stage
checks its own effect, raising StageError when it did nothing. What one stage hands to a later
one travels in its result (`state.result(SmoothResult).activation_ranges`), or, for the model
and the graphs being transformed, in the few working fields below."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, TypeVar

from edgelm.config.plan import BuildPlan
from edgelm.pipeline.results import StageResult, records

# progress(stage_name, completed, total, message): total None = indeterminate
Progress = Callable[[str, float, float | None, str], None]

R = TypeVar("R", bound=StageResult)


def no_progress(stage: str, completed: float, total: float | None, message: str) -> None:
    return None


@dataclass
class BuildState:
    plan: BuildPlan
    work_dir: Path            # scratch files of this build (inside the workspace)
    bundle_dir: Path          # what will be published
    model: Any = None         # the PyTorch model (LoadModel; adapters, pruning and scales change it in place)
    tokenizer: Any = None     # transformers PreTrainedTokenizerFast (LoadModel)
    chat_template: str | None = None
    max_seq_len: int = 0
    source: dict[str, Any] = field(default_factory=dict)           # the model's path, format, sha256 (provenance)
    build_host: dict[str, Any] = field(default_factory=dict)       # this machine's CPU features (preflight)
    reference_onnx: Path | None = None   # fp32 export: parity and quality reference
    current_onnx: Path | None = None     # the graph the next stage transforms
    reference_bundle: Path | None = None
    graph_io: Any = None                 # edgelm_runtime ModelIO of the exported graph (ExportOnnx)
    static_graphs: Any = None            # StaticGraphs: fixed-shape prefill + decode graphs (ExportStatic)
    encoder: Any = None                  # EncoderInputs: an encoder build's task, labels, pooling (EncoderPreflight)
    results: dict[str, StageResult] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def result(self, kind: type[R]) -> R | None:
        """The result a stage of this kind returned in this build (None: it has not run)."""
        found = self.results.get(kind.stage)
        return found if isinstance(found, kind) else None

    @property
    def facts(self) -> dict[str, dict[str, Any]]:
        """Every result as the manifest records it."""
        return records(self.results)


class Stage(Protocol):
    name: str
    title: str

    def run(self, state: BuildState, progress: Progress) -> StageResult:
        """Do the stage's job on `state`; return what it did."""
        ...
