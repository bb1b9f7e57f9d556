"""The runner times stages, keeps their typed results, and turns library failures into one-line StageErrors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest

from edgelm.config import Recipe, load_profile, resolve
from edgelm.errors import StageError
from edgelm.pipeline.results import StageResult
from edgelm.pipeline.runner import run_stages
from edgelm.pipeline.stage import BuildState, no_progress


@dataclass(frozen=True)
class _Answer(StageResult):
    stage: ClassVar[str] = "records"
    answer: int = 0
    scratch: list = None  # left None: not recorded


class _Records:
    name, title = "records", "Record a fact"

    def run(self, state, progress):
        return _Answer(answer=42)


class _ReturnsADict:
    name, title = "dict", "Return an untyped dict"

    def run(self, state, progress):
        return {"answer": 42}


class _Breaks:
    name, title = "breaks", "Fail inside a library"

    def run(self, state, progress):
        raise ValueError("No data is collected.\nlong library detail")


def _state(tmp_path):
    return BuildState(plan=resolve(Recipe(), load_profile("cpu-fp32")), work_dir=tmp_path, bundle_dir=tmp_path)


def test_facts_and_seconds_are_recorded(tmp_path):
    state = run_stages((_Records(),), _state(tmp_path), no_progress)
    assert state.facts == {"records": {"answer": 42}} and state.seconds["records"] >= 0
    assert state.result(_Answer).answer == 42 and state.result(StageResult) is None


def test_a_stage_must_return_a_typed_result(tmp_path):
    with pytest.raises(TypeError, match="dict, not a StageResult"):
        run_stages((_ReturnsADict(),), _state(tmp_path), no_progress)


def test_library_error_becomes_a_one_line_stage_error(tmp_path):
    with pytest.raises(StageError) as err:
        run_stages((_Records(), _Breaks()), _state(tmp_path), no_progress)
    assert err.value.message == "breaks: ValueError: No data is collected."
    assert "--debug" in err.value.hint and isinstance(err.value.__cause__, ValueError)
