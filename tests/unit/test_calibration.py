"""User calibration files: .txt and .jsonl read as samples; bad files named with the fix."""

from __future__ import annotations

import pytest

from edgelm.errors import ConfigError
from edgelm.calibration import builtin_prompts, read_calibration_file


def test_txt_and_jsonl(tmp_path):
    txt = tmp_path / "c.txt"
    txt.write_text("first sample\n\n second sample \n")
    assert read_calibration_file(txt) == ["first sample", "second sample"]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"text": "a b"}\n{"text": "c", "label": 1}\n')
    assert read_calibration_file(jsonl) == ["a b", "c"]


@pytest.mark.parametrize("name, content, message", [
    ("empty.txt", b"\n\n", "has no samples"),
    ("latin1.txt", "caf\xe9".encode("latin-1"), "not UTF-8"),
    ("bad.jsonl", b'{"txt": "x"}\n', 'bad.jsonl:1: expected a JSON object with a "text" field'),
    ("data.csv", b"a,b\n", "must be .txt or .jsonl"),
])
def test_bad_files(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        read_calibration_file(path)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        read_calibration_file(tmp_path / "none.txt")


def test_builtin_prompts_ship_with_the_package():
    prompts = builtin_prompts()
    assert len(prompts) >= 60 and all(p and not p.startswith("#") for p in prompts)
