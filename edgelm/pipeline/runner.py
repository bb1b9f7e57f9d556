"""Run the stages in order: time each, keep its typed result, report progress, turn unexpected
failures into StageError."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from edgelm.errors import EdgelmError, StageError, write_error
from edgelm.pipeline.results import StageResult
from edgelm.pipeline.stage import BuildState, Progress, Stage

logger = logging.getLogger(__name__)


def run_stages(stages: Sequence[Stage], state: BuildState, progress: Progress) -> BuildState:
    for stage in stages:
        start = time.perf_counter()
        progress(stage.name, 0, None, stage.title)
        try:
            result = stage.run(state, progress)
        except EdgelmError:
            raise
        except OSError as exc:
            raise (write_error(exc, stage.name) or StageError(
                stage.name, f"{type(exc).__name__}: {_first_line(exc)}",
                hint="check free disk space and memory, then rerun (--debug shows the traceback)")) from exc
        except MemoryError as exc:
            raise StageError(stage.name, f"{type(exc).__name__}: {_first_line(exc)}",
                             hint="check free disk space and memory, then rerun (--debug shows the traceback)") from exc
        except Exception as exc:  # a library failed inside the stage: one line for the user, the rest with --debug
            disk = write_error(exc, stage.name)  # a library's wrapper around a full disk
            if disk:
                raise disk from exc
            raise StageError(stage.name, f"{type(exc).__name__}: {_first_line(exc)}",
                             hint="rerun with --debug for the full traceback, and report it") from exc
        state.seconds[stage.name] = round(time.perf_counter() - start, 2)
        if not isinstance(result, StageResult):
            raise TypeError(f"stage {stage.name} returned {type(result).__name__}, not a StageResult")
        state.results[stage.name] = result
        logger.info("%s done in %.1fs: %s", stage.name, state.seconds[stage.name], result.record())
        progress(stage.name, 1, 1, stage.title)
    return state


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else "no message"
