"""The CLI's error paths: one `error:` line and a `hint:`, exit code 2, no traceback, no output left."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from edgelm.cli import app

runner = CliRunner()


def _run(*args: str):
    return runner.invoke(app, list(args))


def _assert_clean_error(result, *fragments: str) -> None:
    output = result.output
    assert result.exit_code == 2, output
    assert "Traceback" not in output
    lines = [line for line in output.splitlines() if line.strip()]
    errors = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    assert len(errors) == 1 and lines[errors[0] + 1].startswith("hint: "), output
    for fragment in fragments:
        assert fragment in output


def test_missing_model(tmp_path):
    result = _run("build", "--profile", "cpu-fp32", "--model", str(tmp_path / "nope"), "-o", str(tmp_path / "out"))
    _assert_clean_error(result, "model path does not exist")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".edgelm-build-")]


def test_bad_profile_field(tmp_path):
    profile = tmp_path / "bad.yaml"
    profile.write_text("name: bad\ndescription: x\nprovider: CPUExecutionProvider\n"
                       "quantization: {mode: static-qdq, per_channel: maybe}\n")
    result = _run("build", "--profile", str(profile), "-o", str(tmp_path / "out"))
    _assert_clean_error(result, "bad.yaml", "per_channel")


def test_unknown_profile(tmp_path):
    _assert_clean_error(_run("build", "--profile", "tpu-int2", "-o", str(tmp_path / "out")), "unknown profile", "cpu-int8")


def test_existing_output_without_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _assert_clean_error(_run("build", "-o", str(out)), "already exists", "--force")
    assert (out / "keep.txt").read_text() == "mine"


def test_output_is_a_file(tmp_path):
    out = tmp_path / "out"
    out.write_text("x")
    _assert_clean_error(_run("build", "-o", str(out), "--force"), "output path is a file")


def test_missing_calibration_file_fails_before_anything_is_written(tiny_model_dir, tmp_path):
    result = _run("build", "--model", str(tiny_model_dir), "--calibration", str(tmp_path / "none.txt"), "-o", str(tmp_path / "out"))
    _assert_clean_error(result, "calibration file not found")
    assert not (tmp_path / "out").exists()


def test_generate_on_a_folder_that_is_not_a_bundle(tmp_path):
    _assert_clean_error(_run("generate", str(tmp_path), "hi"), "manifest.json")


def test_profiles_list_and_show(tmp_path, monkeypatch):
    from edgelm import cli

    monkeypatch.setattr(cli.console, "width", 200)  # one table row per line
    result = _run("profiles")
    assert result.exit_code == 0, result.output
    assert "cpu-int8" in result.output and "int8 weights, block 32, int8 compute" in result.output
    assert "W8A8 static QDQ" in result.output and "SkipSimplifiedLayerNormalization" in result.output
    shown = _run("profiles", "show", "cpu-int4")
    assert shown.exit_code == 0 and "accuracy_level: 4" in shown.output and "block_size: 16" in shown.output
    own = tmp_path / "mine.yaml"  # what `show` prints is a profile file: edit it and pass it to --profile
    own.write_text(shown.output.replace("name: cpu-int4", "name: mine").replace("block_size: 16", "block_size: 32"))
    from edgelm.config.profile import load_profile

    mine = load_profile(own)
    assert mine.name == "mine" and mine.quantization.block_size == 32 and mine.quantization.bits == 4
    _assert_clean_error(_run("profiles", "show", "tpu-int2"), "unknown profile 'tpu-int2'")


def test_generate_and_inspect_on_tiny_bundle(tiny_bundle):
    result = _run("generate", str(tiny_bundle), "The weather", "--max-new-tokens", "4")
    assert result.exit_code == 0, result.output
    assert result.output.strip()
    result = _run("inspect", str(tiny_bundle))
    assert result.exit_code == 0 and "cpu-fp32" in result.output and "parity" in result.output


def test_chat_session_through_stdin(tiny_bundle):
    result = runner.invoke(app, ["chat", str(tiny_bundle), "-n", "4"], input="hello\n/reset\nagain\n/exit\n")
    assert result.exit_code == 0, result.output
    assert result.output.count("bot>") == 2 and "history cleared" in result.output


def test_verify_passes_a_good_bundle_and_names_a_damaged_file(tiny_bundle, tmp_path):
    import shutil

    result = _run("verify", str(tiny_bundle))
    assert result.exit_code == 0 and "ok" in result.output and "sha256" in result.output
    copy = Path(shutil.copytree(tiny_bundle, tmp_path / "copy"))
    data = copy / "tokenizer.json"
    text = data.read_bytes()
    data.write_bytes(text[:-2] + (b"}}" if not text.endswith(b"}}") else b"]}"))  # same size, other bytes
    result = _run("verify", str(copy))
    assert result.exit_code == 2 and "tokenizer.json" in result.output and "Traceback" not in result.output


def test_output_folder_not_writable(tiny_model_dir, tiny_recipe):
    out = Path("/sys/edgelm-test-output")  # sysfs: not even root can create a folder there
    result = _run("build", "--profile", "cpu-fp32", "--model", str(tiny_model_dir), "--recipe", str(tiny_recipe),
                  "-o", str(out))
    _assert_clean_error(result, "folder is not writable", "-o")
    assert not out.exists()


def test_disk_full_during_the_write_leaves_the_old_bundle(tiny_model_dir, tiny_recipe, tiny_bundle, tmp_path):
    """A real build whose files may not grow past 64 KB (RLIMIT_FSIZE, the write fails as on a full
    disk): one error line naming the file, exit 2, the previous bundle untouched, no temp folder."""
    import resource
    import shutil
    import signal
    import subprocess

    out = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, out)
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def small_disk() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write then returns EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))

    result = subprocess.run(["edgelm", "build", "--profile", "cpu-fp32", "--model", str(tiny_model_dir), "--recipe",
                             str(tiny_recipe), "-o", str(out), "--force"], capture_output=True, text=True,
                            timeout=600, preexec_fn=small_disk)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert "disk full while writing" in result.stderr and "free space" in result.stderr
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".edgelm-build-")]


def test_calibration_samples_all_longer_than_the_context(tiny_model_dir, tiny_recipe, tmp_path):
    text = tmp_path / "book.txt"  # a whole text on one line: not one-sample-per-line
    text.write_text(" ".join(["The quick brown fox jumps over the lazy dog."] * 200) + "\n")
    result = _run("build", "--profile", "cpu-w8a8", "--model", str(tiny_model_dir), "--recipe", str(tiny_recipe),
                  "--calibration", str(text), "-o", str(tmp_path / "out"))
    _assert_clean_error(result, "book.txt: every calibration sample is longer than the context (256 tokens", "one sample per line")
    assert not (tmp_path / "out").exists()


def test_version_and_short_help():
    from importlib.metadata import version

    result = _run("--version")
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"edgelm {version('edgelm')}, edgelm-runtime {version('edgelm-runtime')}"
    for args in ([], ["build"], ["eval"], ["profiles"], ["profiles", "show"]):
        short, long = _run(*args, "-h"), _run(*args, "--help")
        assert short.exit_code == 0 and short.output == long.output and "Usage:" in short.output, short.output
    build_help = _run("build", "-h").output
    assert "--force" in build_help and "<bool>" not in build_help  # flags show as flags
    assert "<bool>" not in _run("inspect", "-h").output and "<bool>" not in _run("-h").output


def test_help_and_version_import_no_torch():
    import subprocess
    import sys

    code = ("import sys\nfrom edgelm import cli\n"
            "for args in (['--help'], ['build', '--help'], ['eval', '-h'], ['--version']):\n"
            "    try:\n        cli.app(args)\n    except SystemExit:\n        pass\n"
            "print('loaded:' + ','.join(m for m in ('torch', 'transformers', 'onnx') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "loaded:", result.stdout[-500:]


def _piped(*args: str) -> str:
    """The CLI with stdout to a pipe (not a terminal) and no COLUMNS: how `edgelm ... | cat` runs."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    result = subprocess.run([sys.executable, "-m", "edgelm.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "…" not in result.stdout, result.stdout
    return result.stdout


def test_piped_tables_keep_every_digit(tiny_bundle):
    import re

    import edgelm_runtime as er

    manifest = er.read_manifest(tiny_bundle)
    size = sum(entry.size for entry in manifest.files.values())
    shown = _piped("inspect", str(tiny_bundle))
    assert f"{size / 1e6:.1f} MB in {len(manifest.files)} files" in shown
    quality = manifest.quality
    assert f"ppl {quality['perplexity']:.2f} vs {quality['reference_perplexity']:.2f}" in shown
    table = _piped("bench", str(tiny_bundle), "--threads", "1", "--repeats", "1", "--warmup", "0", "--decode-tokens", "4")
    row = next(line for line in table.splitlines() if tiny_bundle.name in line and "x1.00" in line)  # one row, one line
    assert re.search(r"\d+\.\d \(\d+\.\d-\d+\.\d\)", row), row  # decode median (min-max), whole
