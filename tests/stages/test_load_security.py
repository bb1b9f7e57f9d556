"""A model folder is data: its Python files never run, its weights come only from inside it, its
config must describe the weights it sits beside, and a hostile tokenizer.json fails in one line.
Each refusal comes before any module is built, naming the file and the field."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgelm import api
from edgelm.cli import app
from edgelm.errors import ModelLoadError
from edgelm.stages.load import model as load

EVIL = """import pathlib
pathlib.Path(__file__).with_name("RAN").write_text("model-folder code ran")
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
class EvilConfig(LlamaConfig): pass
class EvilModel(LlamaForCausalLM): pass
class EvilTokenizer(PreTrainedTokenizerFast): pass
"""


def _copy(model_dir: Path, folder: Path) -> Path:
    return Path(shutil.copytree(model_dir, folder))


def _edit(path: Path, **fields) -> None:
    data = json.loads(path.read_text())
    data.update(fields)
    path.write_text(json.dumps(data))


def _preflight(folder: Path | str, recipe: Path | None = None):
    return api.preflight(api.plan_build(profile="cpu-fp32", recipe=recipe, model=str(folder), name="x"))


def _build_cli(folder: Path, out: Path, stdin: str = ""):
    return CliRunner().invoke(app, ["build", "--profile", "cpu-fp32", "--model", str(folder), "-o", str(out)], input=stdin)


def _assert_one_line(result, *fragments: str) -> None:
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert len(errors) == 1 and lines[errors[0] + 1].startswith("hint: "), result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


class TestModelFolderCodeNeverRuns:
    @pytest.mark.parametrize("file", ["config.json", "tokenizer_config.json"])
    def test_auto_map_for_a_type_transformers_lacks_is_refused(self, tiny_model_dir, tmp_path, file):
        folder = _copy(tiny_model_dir, tmp_path / "custom")
        (folder / "evil.py").write_text(EVIL)
        if file == "config.json":
            _edit(folder / file, model_type="evil", auto_map={"AutoConfig": "evil.EvilConfig",
                                                              "AutoModelForCausalLM": "evil.EvilModel"})
        else:
            _edit(folder / file, tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": ["evil.EvilTokenizer", None]})
        result = _build_cli(folder, tmp_path / "out", stdin="y\ny\ny\n")  # a "y" used to run evil.py
        _assert_one_line(result, f"{file}: auto_map asks to run the model folder's own Python code",
                         "edgelm never runs model-folder code")
        assert "corrupt" not in result.output
        assert not (folder / "RAN").exists() and not (tmp_path / "out").exists()

    def test_auto_map_beside_a_type_transformers_ships_runs_nothing(self, tiny_model_dir, tmp_path, monkeypatch):
        """Phi-3's releases carry an auto_map: transformers' own class is used, the .py never imported."""
        folder = _copy(tiny_model_dir, tmp_path / "native")
        (folder / "evil.py").write_text(EVIL)
        _edit(folder / "config.json", auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"})
        _edit(folder / "tokenizer_config.json", auto_map={"AutoTokenizer": ["evil.EvilTokenizer", None]})
        monkeypatch.setattr("sys.stdin", _Answer("y\n"))  # as if a user typed "y" at transformers' question
        loaded = load.load_pretrained(str(folder))
        assert type(loaded.model).__name__ == "LlamaForCausalLM" and "Evil" not in type(loaded.tokenizer).__name__
        assert not (folder / "RAN").exists()

    def test_every_transformers_call_passes_trust_remote_code_false(self, tiny_model_dir, tiny_gguf_file, monkeypatch):
        import transformers

        seen = []
        for cls in (transformers.AutoConfig, transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
            original = cls.from_pretrained.__func__

            def spy(kind, *args, _original=original, _name=cls.__name__, **kwargs):
                seen.append((_name, kwargs.get("trust_remote_code", "missing")))
                return _original(kind, *args, **kwargs)

            monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
        load._read_config.cache_clear()
        for spec in (str(tiny_model_dir), str(tiny_gguf_file)):
            load.load_pretrained(spec)
        names = {name for name, _ in seen}
        assert {"AutoConfig", "AutoModelForCausalLM", "AutoTokenizer"} <= names, seen
        assert all(flag is False for _, flag in seen), seen


class _Answer:
    def __init__(self, text: str) -> None:
        self.text = text

    def readline(self, *_: object) -> str:
        return self.text

    def read(self, *_: object) -> str:
        return self.text

    def isatty(self) -> bool:
        return True


class TestConfigMustMatchTheWeights:
    @pytest.mark.parametrize(("field", "value", "message"), [
        ("num_hidden_layers", 1_000_000, "num_hidden_layers is 1000000 but the weights hold 2 layers (model.layers.0-1)"),
        ("vocab_size", 1_000_000_000, "vocab_size is 1000000000 but the weights' embed_tokens.weight has 384 rows"),
        ("hidden_size", 10_000_000, "hidden_size is 10000000 but the weights' embed_tokens.weight has 64 columns"),
        ("num_hidden_layers", 1, "num_hidden_layers is 1 but the weights hold 2 layers"),
        ("intermediate_size", 100, "intermediate_size is 100 but the weights' mlp.down_proj.weight has 128 columns"),
        ("num_key_value_heads", 4, "num_key_value_heads x head_dim is 64 but the weights' self_attn.k_proj.weight has 32 rows"),
    ])
    def test_preflight_refuses_a_size_the_weights_do_not_have(self, tiny_model_dir, tmp_path, field, value, message):
        folder = _copy(tiny_model_dir, tmp_path / "m")
        _edit(folder / "config.json", **{field: value})
        started = time.monotonic()
        with pytest.raises(ModelLoadError) as caught:
            _preflight(folder)
        assert time.monotonic() - started < 10  # 1,000,000 layers used to sit in the load stage for minutes
        assert str(caught.value).startswith(f"{folder / 'config.json'}: {message}"), caught.value
        assert "\n" not in str(caught.value) and "config.json saved with them" in caught.value.hint

    def test_the_cli_build_fails_in_seconds(self, tiny_model_dir, tmp_path):
        folder = _copy(tiny_model_dir, tmp_path / "m")
        _edit(folder / "config.json", num_hidden_layers=1_000_000)
        started = time.monotonic()
        result = _build_cli(folder, tmp_path / "out")
        assert time.monotonic() - started < 30
        _assert_one_line(result, "config.json: num_hidden_layers is 1000000 but the weights hold 2 layers")

    @pytest.mark.parametrize(("key", "value", "message"), [
        ("llama.block_count", 1_000_000, "block_count (num_hidden_layers) is 1000000 but the weights hold 2 layers (blk.0-1)"),
        ("llama.embedding_length", 10_000_000,
         "embedding_length (hidden_size) is 10000000 but the weights' token_embd.weight has 64 columns"),
    ])
    def test_a_gguf_whose_metadata_disagrees_with_its_tensors(self, tiny_gguf_file, tmp_path, key, value, message):
        from gguf import GGUFReader

        path = Path(shutil.copy(tiny_gguf_file, tmp_path / "m.gguf"))
        reader = GGUFReader(str(path), "r+")
        reader.fields[key].parts[reader.fields[key].data[0]][0] = value
        del reader
        with pytest.raises(ModelLoadError) as caught:
            _preflight(path)
        assert str(caught.value).startswith(f"{path}: {message}"), caught.value
        assert "convert" in caught.value.hint

    def test_a_mismatch_transformers_finds_is_not_called_corrupt(self, tiny_model_dir, tmp_path, monkeypatch):
        """A mismatch the header check lets through (here: the check is off) still fails in one line
        naming config.json, never pointing at transformers' report "above" (which the user never sees)."""
        folder = _copy(tiny_model_dir, tmp_path / "m")
        _edit(folder / "config.json", intermediate_size=100)
        monkeypatch.setattr(load, "check_sizes", lambda *args: None)
        with pytest.raises(ModelLoadError) as caught:
            load.load_pretrained(str(folder))
        assert "tensor shapes do not match config.json" in str(caught.value)
        assert "above" not in str(caught.value) and "corrupt" not in caught.value.hint
        assert "config.json saved with them" in caught.value.hint


def _sharded(tiny_model_dir: Path, folder: Path) -> Path:
    """The tiny model saved in several safetensors shards with an index."""
    from transformers import AutoModelForCausalLM

    _copy(tiny_model_dir, folder)
    (folder / "model.safetensors").unlink()
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(folder, max_shard_size="100KB")
    assert (folder / "model.safetensors.index.json").is_file() and not (folder / "model.safetensors").exists()
    return folder


class TestWeightsComeFromInsideTheFolder:
    @pytest.mark.parametrize("escape", ["absolute", "parent", "symlink"])
    def test_an_index_pointing_outside_is_refused(self, tiny_model_dir, tmp_path, escape):
        folder = _sharded(tiny_model_dir, tmp_path / "sharded")
        index_path = folder / "model.safetensors.index.json"
        index = json.loads(index_path.read_text())
        shard = sorted(set(index["weight_map"].values()))[0]
        outside = tmp_path / "elsewhere" / shard
        outside.parent.mkdir()
        shutil.move(folder / shard, outside)
        name = {"absolute": str(outside), "parent": f"../elsewhere/{shard}", "symlink": shard}[escape]
        if escape == "symlink":
            (folder / shard).symlink_to(outside)
        index["weight_map"] = {k: (name if v == shard else v) for k, v in index["weight_map"].items()}
        index_path.write_text(json.dumps(index))
        for attempt in (lambda: _preflight(folder), lambda: load.source_fingerprint(folder, None)):
            with pytest.raises(ModelLoadError, match="model.safetensors.index.json: weight file .* outside the model folder") \
                    as caught:
                attempt()
            assert repr(name) in str(caught.value) and "inside the model folder" in caught.value.hint

    def test_the_fingerprint_covers_what_the_build_reads(self, tiny_model_dir, tmp_path):
        folder = _sharded(tiny_model_dir, tmp_path / "sharded")
        before = load.source_fingerprint(folder, None)
        (folder / "unrelated.safetensors").write_bytes(b"not read by the build")
        assert load.source_fingerprint(folder, None) == before
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        for name in [sorted(set(index["weight_map"].values()))[-1], "tokenizer.json", "chat_template.jinja"]:
            with open(folder / name, "ab") as handle:
                handle.write(b" ")
            changed = load.source_fingerprint(folder, None)
            assert changed != before, name
            before = changed
        loaded = _preflight(folder)  # the sharded folder still builds
        assert loaded.family == "llama"

    def test_a_hub_cache_snapshot_may_link_into_its_blobs(self, tiny_model_dir, tmp_path):
        entry = tmp_path / "hub" / "models--org--m"
        snapshot = entry / "snapshots" / ("0" * 40)
        snapshot.mkdir(parents=True)
        (entry / "blobs").mkdir()
        for path in tiny_model_dir.iterdir():
            blob = entry / "blobs" / path.name
            shutil.copy(path, blob)
            (snapshot / path.name).symlink_to(Path("../../blobs") / path.name)
        assert len(load.source_fingerprint(snapshot, None)) == 64
        assert _preflight(snapshot).family == "llama"


def _hostile_tokenizer(model_dir: Path, folder: Path) -> Path:
    """A tokenizer.json whose Split regex makes the Rust library panic (retry-limit-in-match over)."""
    _copy(model_dir, folder)
    data = json.loads((folder / "tokenizer.json").read_text())
    split = {"type": "Split", "pattern": {"Regex": r"(\w|a)*b"}, "behavior": "Isolated", "invert": False}
    data["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [split, data["pre_tokenizer"]]}
    (folder / "tokenizer.json").write_text(json.dumps(data))
    return folder


class TestHostileTokenizer:
    @pytest.mark.parametrize("when", ["preflight", "load"])
    def test_a_panicking_regex_is_refused_in_one_line(self, tiny_model_dir, tmp_path, capfd, when):
        folder = _hostile_tokenizer(tiny_model_dir, tmp_path / "m")
        with pytest.raises(ModelLoadError) as caught:
            _preflight(folder) if when == "preflight" else load.load_pretrained(str(folder))
        assert str(caught.value).startswith(f"{folder / 'tokenizer.json'}: ")
        assert "\n" not in str(caught.value) and "retry-limit" in str(caught.value) and caught.value.hint
        assert "panicked" not in capfd.readouterr().err

    def test_the_cli_build_says_so_without_a_traceback(self, tiny_model_dir, tmp_path):
        folder = _hostile_tokenizer(tiny_model_dir, tmp_path / "m")
        _assert_one_line(_build_cli(folder, tmp_path / "out"), "tokenizer.json: the tokenizer fails on ordinary text")
        assert not (tmp_path / "out").exists()

    def test_an_unreadable_tokenizer_is_named(self, tiny_model_dir, tmp_path):
        folder = _copy(tiny_model_dir, tmp_path / "m")
        data = json.loads((folder / "tokenizer.json").read_text())
        data["pre_tokenizer"] = {"type": "Split", "pattern": {"Regex": "(unclosed"}, "behavior": "Isolated", "invert": False}
        (folder / "tokenizer.json").write_text(json.dumps(data))
        with pytest.raises(ModelLoadError, match="tokenizer.json: cannot load the tokenizer"):
            load.load_pretrained(str(folder))
