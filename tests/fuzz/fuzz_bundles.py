"""Fuzz the runtime with damaged bundles: mutated manifests, truncated or corrupted model and
tokenizer files, hostile chat and prompt templates. Loading and using each one (generate, chat,
classify) must end in success or an edgelm_runtime error (BundleError, TemplateError, ...), never
another exception, a crash or a hang.

Each case prints itself before it runs (so a crash names its case), runs under a time limit, and
the run ends with a summary line; the exit code is 1 if any case broke the rule.

    python tests/fuzz/fuzz_bundles.py BUNDLE --cases 2000 --seed 1     # the long run
    (tests/fuzz/test_fuzz.py runs 80 cases with seed 0 in CI)
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import edgelm_runtime as er
from edgelm_runtime.bundle import MANIFEST_FILE, describe_files
from edgelm_runtime.errors import EdgelmRuntimeError

CASE_SECONDS = 20.0
HOSTILE_TEMPLATES = [
    "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
    "{{ 'x' * 10**9 }}",
    "{{ 9**99999 }}",
    "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.system('echo owned') }}",
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "{{ '%999999999s' % 'x' }}",
    "{{ messages[0]['content'] | center(1000000000) }}",
    "{% for m in messages %}{{ m.content.__class__ }}{% endfor %}",
    "{{ raise_exception('no') }}",
    "{% for m in messages %}",
    "{{ messages | tojson(indent=99999999) }}",
]
JUNK_VALUES: list[Any] = [None, -1, 0, 1, 7, 4096, 2**63, -(2**63), 1e308, float("nan"), "", "../../etc/passwd", "/etc/passwd",
                          [], {}, [1, "a", None], {"x": {"y": [None]}}, True, "\x00", "é" * 1000, 3.5]


class CaseTimeout(Exception):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise CaseTimeout()


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path in a JSON value (dict keys and list indices)."""
    found = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, prefix + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value[:8]):
            found += _paths(item, prefix + (index,))
    return found


def _set(data: Any, path: tuple, value: Any, delete: bool = False) -> None:
    for part in path[:-1]:
        data = data[part]
    if delete:
        del data[path[-1]]
    else:
        data[path[-1]] = value


def _relist(folder: Path, data: dict) -> None:
    data["files"] = {rel: {"sha256": e.sha256, "size": e.size} for rel, e in describe_files(folder).items()}


def mutate_manifest(rng: random.Random, folder: Path) -> str:
    path = folder / MANIFEST_FILE
    data = json.loads(path.read_text())
    # the runtime never reads provenance, and the plan only as a whole: mutate what it reads
    choices = [p for p in _paths(data) if p[0] not in ("provenance", "plan") or len(p) == 1]
    described = []
    for _ in range(rng.randint(1, 3)):
        target = rng.choice(choices)
        action = rng.choice(["junk", "junk", "delete", "unknown"])
        try:
            if action == "delete":
                _set(data, target, None, delete=True)
            elif action == "unknown":
                container_path = target[:-1]
                container = data
                for part in container_path:
                    container = container[part]
                if isinstance(container, dict):
                    container["surprise_" + str(rng.randint(0, 99))] = copy.deepcopy(rng.choice(JUNK_VALUES))
            else:
                _set(data, target, copy.deepcopy(rng.choice(JUNK_VALUES)))
        except (KeyError, IndexError, TypeError):
            continue
        described.append(f"{action} {'.'.join(map(str, target))}")
    text = json.dumps(data, allow_nan=True)
    if rng.random() < 0.1:  # not even JSON
        text = text[: rng.randint(0, len(text))]
        described.append("truncated json")
    path.write_text(text)
    return "manifest: " + ", ".join(described)


def damage_file(rng: random.Random, folder: Path) -> str:
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    candidates = [name for name in manifest["files"] if (folder / name).is_file()]
    name = rng.choice(candidates)
    path = folder / name
    data = bytearray(path.read_bytes())
    how = rng.choice(["truncate", "flip", "garbage", "empty"])
    if how == "truncate":
        data = data[: rng.randint(0, max(0, len(data) - 1))]
    elif how == "flip":
        for _ in range(rng.randint(1, 64)):
            if data:
                data[rng.randrange(len(data))] = rng.randrange(256)
    elif how == "garbage":
        data = bytearray(rng.randbytes(rng.randint(1, 4096)))
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    relisted = rng.random() < 0.6  # so the damage reaches the parsers, not only the size/hash check
    if relisted:
        _relist(folder, manifest)
        (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    return f"{how} {name}{' (relisted)' if relisted else ''}"


def hostile_template(rng: random.Random, folder: Path) -> str:
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    source = rng.choice(HOSTILE_TEMPLATES)
    if rng.random() < 0.3:
        source = source[: rng.randint(0, len(source))]
    name = manifest.get("chat_template_file") or "templates/chat.jinja"
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(source)
    manifest["chat_template_file"] = name
    if manifest.get("prompt_templates_file") and rng.random() < 0.5:
        prompts_path = folder / manifest["prompt_templates_file"]
        prompts = json.loads(prompts_path.read_text())
        first = next(iter(prompts.get("templates", prompts)), None)
        container = prompts.get("templates", prompts)
        if first is not None and isinstance(container.get(first), dict):
            container[first][rng.choice(["query", "template", "instruction"])] = rng.choice(
                ["{text:>999999999}", "{text!r}", "{", "{0}", "{text.__class__}", "}{", "{text}" * 1000])
        prompts_path.write_text(json.dumps(prompts))
    _relist(folder, manifest)
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    return f"template {source[:50]!r}"


MUTATIONS: list[Callable[[random.Random, Path], str]] = [mutate_manifest, mutate_manifest, damage_file, hostile_template]


def exercise(folder: Path, rng: random.Random) -> str:
    """Load the bundle and use it the ways an app does; returns what got how far."""
    llm = er.load_bundle(folder, verify=rng.random() < 0.5, threads=1)
    llm.generate("Hello", max_new_tokens=2)
    llm.chat([{"role": "user", "content": "Hi"}], max_new_tokens=2)
    templates = llm.templates
    if templates:
        name = sorted(templates)[0]
        template = templates[name]
        if template.kind == "classify":
            llm.classify("a fine film", template=name)
        else:
            llm.complete(name, max_new_tokens=2, **{v: "x" for v in template.variables})
    return "used"


def run(bundle: Path, cases: int, seed: int, verbose: bool = True) -> dict[str, Any]:
    rng = random.Random(seed)
    outcomes: Counter = Counter()
    failures: list[str] = []
    slowest = 0.0
    signal.signal(signal.SIGALRM, _alarm)
    with tempfile.TemporaryDirectory(prefix="edgelm-fuzz-") as scratch:
        for case in range(cases):
            folder = Path(scratch) / f"case{case}"
            shutil.copytree(bundle, folder)
            mutation = rng.choice(MUTATIONS)
            description = f"case {case}: {mutation(rng, folder)}"
            if verbose:
                print(description, flush=True)
            started = time.perf_counter()
            signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
            try:
                outcomes[exercise(folder, rng)] += 1
            except EdgelmRuntimeError as exc:
                outcomes[type(exc).__name__] += 1
                if verbose:
                    print(f"  -> {type(exc).__name__}: {exc.message[:150]}", flush=True)
            except CaseTimeout:
                failures.append(f"{description}: hung (over {CASE_SECONDS:g} s)")
            except Exception as exc:  # the rule this fuzzer checks: nothing else may escape
                failures.append(f"{description}: {type(exc).__name__}: {exc}\n{traceback.format_exc(limit=4)}")
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            slowest = max(slowest, time.perf_counter() - started)
            shutil.rmtree(folder, ignore_errors=True)
    return {"cases": cases, "seed": seed, "outcomes": dict(outcomes), "failures": failures,
            "slowest_case_s": round(slowest, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--cases", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    summary = run(args.bundle, args.cases, args.seed, verbose=not args.quiet)
    for failure in summary["failures"]:
        print("FAIL", failure, file=sys.stderr)
    print(json.dumps({k: v for k, v in summary.items() if k != "failures"} | {"failures": len(summary["failures"])}))
    return 1 if summary["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
