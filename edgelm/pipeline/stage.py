"""The Stage contract and the BuildState that stages read and extend.

A stage does one job, records what it did in `state.facts[stage.name]` (these go into the
manifest and the build summary) and checks its own effect, raising StageError when it did nothing."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from edgelm.config.plan import BuildPlan

# progress(stage_name, completed, total, message): total None = indeterminate
Progress = Callable[[str, float, float | None, str], None]


def no_progress(stage: str, completed: float, total: float | None, message: str) -> None:
    return None


@dataclass
class BuildState:
    plan: BuildPlan
    work_dir: Path            # scratch files of this build (inside the workspace)
    bundle_dir: Path          # what will be published
    model: Any = None         # the PyTorch model (LoadModel)
    tokenizer: Any = None     # transformers PreTrainedTokenizerFast (LoadModel)
    chat_template: str | None = None
    max_seq_len: int = 0
    source: dict[str, Any] = field(default_factory=dict)
    adapters: list[dict[str, Any]] = field(default_factory=list)  # merged adapters (MergeAdapters)
    build_host: dict[str, Any] = field(default_factory=dict)      # this machine's CPU features (preflight)
    reference_onnx: Path | None = None   # fp32 export: parity and quality reference
    current_onnx: Path | None = None     # the graph the next stage transforms
    reference_bundle: Path | None = None
    graph_io: Any = None                 # edgelm_runtime ModelIO of the exported graph (ExportOnnx)
    static_graphs: Any = None            # StaticGraphs: fixed-shape prefill + decode graphs (ExportStatic)
    activation_stats: dict[str, float] = field(default_factory=dict)  # module path -> input outlier ratio (Smooth)
    activation_ranges: dict[str, tuple[float, float]] = field(default_factory=dict)  # module path -> input (min, max)
    sensitivity: dict[str, float] = field(default_factory=dict)  # module path -> KL when its group alone is int8
    facts: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


class Stage(Protocol):
    name: str
    title: str

    def run(self, state: BuildState, progress: Progress) -> dict[str, Any]:
        """Do the stage's job on `state`; return the facts to record (summary + manifest)."""
        ...
