"""Every row of the README's "Bad input" table, through the `edgelm` command: one `error:` line
naming the file or field, a `hint:` with the fix, exit code 2, no traceback, and nothing written.

Each case's id is its row in the README. (Disk full and interrupted builds need a subprocess and
live in tests/integration/test_cli.py and tests/integration/test_interrupted_build.py.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import pytest

from tests.stages.test_adapters import make_adapter
from tests.integration.test_cli import _assert_clean_error
from tests.integration.test_cli_adapters import _other_base


def _copy_model(tiny_model_dir: Path, tmp: Path) -> Path:
    return Path(shutil.copytree(tiny_model_dir, tmp / "model"))


def _build(model: Path | str, tmp: Path, recipe: Path, *extra: str) -> tuple[str, ...]:
    return ("build", "--profile", "cpu-fp32", "--model", str(model), "--recipe", str(recipe), "-o", str(tmp / "out"), *extra)


def _with_manifest(bundle: Path, tmp: Path, edit: Callable[[dict], None]) -> Path:
    copy = Path(shutil.copytree(bundle, tmp / "bundle"))
    data = json.loads((copy / "manifest.json").read_text())
    edit(data)
    (copy / "manifest.json").write_text(json.dumps(data))
    return copy


def _template_bundle(bundle: Path, tmp: Path, source: str) -> Path:
    from edgelm_runtime.bundle import describe_files

    copy = Path(shutil.copytree(bundle, tmp / "bundle"))
    (copy / "templates").mkdir(exist_ok=True)
    (copy / "templates" / "chat.jinja").write_text(source)
    data = json.loads((copy / "manifest.json").read_text())
    data["chat_template_file"] = "templates/chat.jinja"
    data["files"] = {rel: {"sha256": e.sha256, "size": e.size} for rel, e in describe_files(copy).items()}
    (copy / "manifest.json").write_text(json.dumps(data))
    return copy


def _model_missing(f, tmp):
    return _build(tmp / "nope", tmp, f.recipe), ["model path does not exist", "--model"]


def _folder_without_config(f, tmp):
    (tmp / "empty").mkdir()
    return _build(tmp / "empty", tmp, f.recipe), ["no config.json in this folder"]


def _folder_without_weights(f, tmp):
    model = _copy_model(f.model, tmp)
    (model / "model.safetensors").unlink()
    return _build(model, tmp, f.recipe), ["no *.safetensors weights", "safe_serialization=True"]


def _truncated_safetensors(f, tmp):
    model = _copy_model(f.model, tmp)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return _build(model, tmp, f.recipe), ["cannot load weights or tokenizer", "complete"]


def _truncated_gguf(f, tmp):
    gguf = tmp / "model.gguf"
    gguf.write_bytes(f.gguf.read_bytes()[:4096])
    return _build(gguf, tmp, f.recipe), ["model.gguf: cannot", "complete"]


def _unsupported_architecture(f, tmp):
    return _build(_other_base(tmp / "gpt2", model_type="gpt2"), tmp, f.recipe), ["architecture 'gpt2' is not supported", "llama"]


def _pickle_weights(f, tmp):
    model = _copy_model(f.model, tmp)
    (model / "model.safetensors").rename(model / "pytorch_model.bin")
    return _build(model, tmp, f.recipe), ["pickle weights (*.bin/*.pt) found; they are refused", "safe_serialization=True"]


def _adapter_for_another_base(f, tmp):
    adapter = make_adapter(_other_base(tmp / "other", hidden_size=32, intermediate_size=64), tmp / "adapter")
    return _build(f.model, tmp, f.recipe, "--adapter", str(adapter)), ["adapter made for another base", "this base model"]


def _adapter_pickle(f, tmp):
    adapter = make_adapter(f.model, tmp / "adapter")
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    return _build(f.model, tmp, f.recipe, "--adapter", str(adapter)), ["pickle adapter weights are refused", "save_file"]


def _unknown_profile(f, tmp):
    return ("build", "--profile", "tpu-int2", "-o", str(tmp / "out")), ["unknown profile 'tpu-int2'", "cpu-int8"]


def _profile_yaml_syntax(f, tmp):
    (tmp / "p.yaml").write_text("name: x\nquantization: {mode: none\n")
    return ("build", "--profile", str(tmp / "p.yaml"), "-o", str(tmp / "out")), ["p.yaml: line", "YAML syntax error"]


def _recipe_yaml_syntax(f, tmp):
    (tmp / "r.yaml").write_text("calibration:\n  samples: 4\n bad: indent\n")
    return ("build", "--recipe", str(tmp / "r.yaml"), "-o", str(tmp / "out")), ["r.yaml: line", "YAML syntax error"]


def _unknown_field(f, tmp):
    (tmp / "r.yaml").write_text("calibraton: {samples: 4}\n")
    return ("build", "--recipe", str(tmp / "r.yaml"), "-o", str(tmp / "out")), ["r.yaml: calibraton: unknown field"]


def _mistyped_field(f, tmp):
    (tmp / "r.yaml").write_text("calibration: {samples: many}\n")
    return ("build", "--recipe", str(tmp / "r.yaml"), "-o", str(tmp / "out")), ["r.yaml: calibration.samples", "many"]


def _negative_fraction(f, tmp):
    (tmp / "r.yaml").write_text("prune: {mlp_fraction: -0.25}\n")
    return ("build", "--recipe", str(tmp / "r.yaml"), "-o", str(tmp / "out")), ["r.yaml: prune.mlp_fraction", "-0.25"]


def _block_size_7(f, tmp):
    from edgelm.config.profile import load_profile

    (tmp / "p.yaml").write_text(load_profile("cpu-int4").model_dump_json().replace('"block_size":16', '"block_size":7'))
    return ("build", "--profile", str(tmp / "p.yaml"), "-o", str(tmp / "out")), ["p.yaml: quantization.weight-only.block_size", "7"]


def _npu_op_not_allowed(f, tmp):
    """A device that cannot run Softmax: the build stops at the device check, naming the op."""
    import yaml

    from tests.conftest import npu_profile

    path = npu_profile(tmp)
    data = yaml.safe_load(path.read_text())
    data["allowed_ops"] = [op for op in data["allowed_ops"] if op != "Softmax"]
    path.write_text(yaml.safe_dump(data))
    return ("build", "--profile", str(path), "--model", str(f.model), "--recipe", str(f.recipe), "-o", str(tmp / "out")), \
        ["device: model.onnx has ops the npu-qdq device does not run: Softmax x2", "allowed_ops"]


def _npu_unsupported_combination(f, tmp):
    from tests.conftest import npu_profile

    path = npu_profile(tmp)
    path.write_text(path.read_text().replace("opset: 23", "opset: 18"))
    return ("build", "--profile", str(path), "-o", str(tmp / "out")), ["npu-qdq.yaml: export.opset: static graphs need opset 23"]


def _npu_window_beyond_context(f, tmp):
    from tests.conftest import npu_profile

    path = npu_profile(tmp, kv_window=384)  # the tiny recipe's max_seq_len is 256
    return ("build", "--profile", str(path), "--model", str(f.model), "--recipe", str(f.recipe), "-o", str(tmp / "out")), \
        ["export.kv_window 384 exceeds max_seq_len 256", "--max-seq-len"]


def _prune_drops_every_layer(f, tmp):
    (tmp / "r.yaml").write_text(f.recipe.read_text() + "prune: {drop_layers: [0, 1]}\n")
    return _build(f.model, tmp, tmp / "r.yaml"), ["prune.drop_layers: dropping all 2 layers leaves no model", "keep at least one"]


def _prune_removes_every_kv_group(f, tmp):
    (tmp / "r.yaml").write_text(f.recipe.read_text() + "prune: {kv_groups_fraction: 0.9}\n")
    return _build(f.model, tmp, tmp / "r.yaml"), ["prune.kv_groups_fraction: 0.9 of 2 KV groups removes all of them"]


def _prune_mlp_fraction_one(f, tmp):
    return _build(f.model, tmp, f.recipe, "--prune-mlp", "1"), ["prune.mlp_fraction: Input should be less than 1"]


def _calibration_missing(f, tmp):
    return _build(f.model, tmp, f.recipe, "--calibration", str(tmp / "none.txt")), ["none.txt: calibration file not found"]


def _calibration_empty(f, tmp):
    (tmp / "c.txt").write_text("\n\n")
    return _build(f.model, tmp, f.recipe, "--calibration", str(tmp / "c.txt")), ["c.txt: calibration file has no samples"]


def _calibration_not_utf8(f, tmp):
    (tmp / "c.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    return _build(f.model, tmp, f.recipe, "--calibration", str(tmp / "c.txt")), ["c.txt: calibration file is not UTF-8"]


def _calibration_too_long(f, tmp):
    (tmp / "c.txt").write_text(" ".join(["A long line without any breaks."] * 300) + "\n")
    return _build(f.model, tmp, f.recipe, "--calibration", str(tmp / "c.txt")), ["every calibration sample is longer than the context"]


def _output_is_a_file(f, tmp):
    (tmp / "out").write_text("x")
    return ("build", "-o", str(tmp / "out"), "--force"), ["output path is a file"]


def _output_exists(f, tmp):
    (tmp / "out").mkdir()
    return ("build", "-o", str(tmp / "out")), ["output already exists", "--force"]


def _output_not_writable(f, tmp):
    return _build(f.model, Path("/sys"), f.recipe), ["folder is not writable"]


def _no_manifest(f, tmp):
    (tmp / "folder").mkdir()
    return ("generate", str(tmp / "folder"), "hi"), ["no manifest.json"]


def _newer_format(f, tmp):
    copy = _with_manifest(f.bundle, tmp, lambda m: m.update(format_version=99))
    return ("generate", str(copy), "hi"), ["format_version 99 is newer", "pip install -U edgelm-runtime"]


def _path_escape(f, tmp):
    outside = tmp / "outside.json"
    outside.write_text("{}")
    copy = _with_manifest(f.bundle, tmp, lambda m: m["files"].update({"../outside.json": {"sha256": "0" * 64, "size": 2}}))
    return ("generate", str(copy), "hi"), ["../outside.json", "leaves the bundle folder"]


def _size_mismatch(f, tmp):
    copy = Path(shutil.copytree(f.bundle, tmp / "bundle"))
    tokenizer = copy / "tokenizer.json"
    tokenizer.write_bytes(tokenizer.read_bytes()[:-10])
    return ("generate", str(copy), "hi"), ["tokenizer.json is", "bytes, manifest says"]


def _hash_mismatch(f, tmp):
    copy = Path(shutil.copytree(f.bundle, tmp / "bundle"))
    tokenizer = copy / "tokenizer.json"
    data = tokenizer.read_bytes()
    tokenizer.write_bytes(data[:-2] + (b"]}" if not data.endswith(b"]}") else b"}}"))
    return ("verify", str(copy)), ["tokenizer.json sha256 does not match"]


def _prompt_too_long(f, tmp):
    return ("generate", str(f.bundle), "word " * 400), ["context"]


def _negative_temperature(f, tmp):
    return ("generate", str(f.bundle), "hi", "--temperature", "-1"), ["temperature"]


def _top_p_above_one(f, tmp):
    return ("generate", str(f.bundle), "hi", "--top-p", "1.5"), ["top_p"]


def _template_escape(f, tmp):
    copy = _template_bundle(f.bundle, tmp, "{{ ''.__class__.__mro__[1].__subclasses__() }}")
    return ("chat", str(copy), "-n", "2"), ["chat.jinja", "SecurityError"]


def _template_loops_forever(f, tmp):
    copy = _template_bundle(f.bundle, tmp, "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}")
    return ("chat", str(copy), "-n", "2"), ["chat.jinja: the chat template ran longer than 1 s"]


CASES = {name.lstrip("_").replace("_", "-"): case for name, case in list(globals().items())
         if callable(case) and name.startswith("_") and name not in ("_copy_model", "_build", "_with_manifest",
                                                                       "_template_bundle", "_assert_clean_error", "_run",
                                                                       "_other_base")}


class Fixtures:
    def __init__(self, model: Path, recipe: Path, bundle: Path, gguf: Path) -> None:
        self.model, self.recipe, self.bundle, self.gguf = model, recipe, bundle, gguf


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, tiny_model_dir, tiny_recipe, tiny_bundle, tiny_gguf_file, tmp_path):
    args, fragments = CASES[case](Fixtures(tiny_model_dir, tiny_recipe, tiny_bundle, tiny_gguf_file), tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    from typer.testing import CliRunner

    from edgelm.cli import app

    result = CliRunner().invoke(app, list(args), input="hello\n/exit\n")
    _assert_clean_error(result, *fragments)
    if args[0] == "build":
        assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no temporary folder
