"""Encoder builds, first stages: which task a checkpoint is for, its inputs checked, and the fp32
model with its head loaded.

The task comes from `--task` (or the recipe's `task`), else from the checkpoint when it says so
unambiguously: `*ForSequenceClassification` / `*ForTokenClassification` in config.json's
architectures, a LoRA adapter's task_type (SEQ_CLS, TOKEN_CLS) over a bare encoder, or a
sentence-transformers folder (modules.json), whose pooling (1_Pooling/config.json), Normalize
module and max_seq_length the bundle keeps. Weights load as for decoders: safetensors only, no
model-folder code (edgelm/stages/load/)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgelm.config.plan import DEFAULT_MAX_SEQ_LEN
from edgelm.errors import ConfigError, ModelLoadError
from edgelm.pipeline.results import LoadResult, PreflightResult
from edgelm.pipeline.stage import BuildState, Progress

ENCODER_TASKS = ("feature-extraction", "sequence-classification", "token-classification")
_HEADS = {"feature-extraction": "AutoModel", "sequence-classification": "AutoModelForSequenceClassification",
          "token-classification": "AutoModelForTokenClassification"}
_ADAPTER_TASKS = {"SEQ_CLS": "sequence-classification", "TOKEN_CLS": "token-classification",
                  "FEATURE_EXTRACTION": "feature-extraction"}
_TASK_HINT = "pass --task feature-extraction | sequence-classification | token-classification (or text-generation)"


@dataclass(frozen=True)
class Pooling:
    """How feature-extraction pools token vectors into one: the sentence-transformers folder's
    own settings, else mean pooling with L2 normalisation (what most embedding models use)."""

    mode: str = "mean"
    normalize: bool = True
    max_seq_length: int | None = None
    source: str = "default (no sentence-transformers files)"


@dataclass
class EncoderInputs:
    """What preflight learnt about the checkpoint, for the load stage."""

    folder: Path
    task: str
    config: Any
    labels: tuple[str, ...] = ()
    pooling: Pooling = field(default_factory=Pooling)


def checkpoint_task(model: str, explicit: str | None, adapters: Any = ()) -> str:
    """The build's task: `explicit`, else what the checkpoint (and its adapters) say."""
    if explicit:
        return explicit
    from edgelm.stages.load.model import locate_model

    folder, gguf_file = locate_model(model)
    if gguf_file is not None:
        return "text-generation"
    config = _json(folder / "config.json")
    architectures = config.get("architectures") or []
    for suffix, task in (("ForSequenceClassification", "sequence-classification"),
                         ("ForTokenClassification", "token-classification"), ("ForCausalLM", "text-generation"),
                         ("ForConditionalGeneration", "text-generation")):
        if any(name.endswith(suffix) for name in architectures):
            return task
    adapter_tasks = {_ADAPTER_TASKS.get(_json(Path(a.path) / "adapter_config.json").get("task_type")) for a in adapters
                     if (Path(a.path) / "adapter_config.json").is_file()} - {None}
    if len(adapter_tasks) == 1:
        return adapter_tasks.pop()
    from edgelm.arch import ENCODER_ARCHS

    if config.get("model_type") in ENCODER_ARCHS:
        if (folder / "modules.json").is_file() or any(name.endswith("Model") for name in architectures):
            return "feature-extraction"
        raise ConfigError(f"{folder}: config.json's architectures {architectures} do not say which task to build",
                          hint=_TASK_HINT)
    return "text-generation"


def read_pooling(folder: Path) -> Pooling:
    """A sentence-transformers folder's pooling, normalisation and max_seq_length."""
    modules = folder / "modules.json"
    if not modules.is_file():
        return Pooling()
    entries = _json(modules)
    if not isinstance(entries, list):
        raise ModelLoadError(f"{modules}: expected a list of modules", hint="save the model again with sentence-transformers")
    kinds = {str(entry.get("type", "")).rsplit(".", 1)[-1]: entry for entry in entries if isinstance(entry, dict)}
    mode = "mean"
    if "Pooling" in kinds:
        path = folder / kinds["Pooling"].get("path", "1_Pooling") / "config.json"
        settings = _json(path)
        chosen = [name for name in ("cls_token", "mean_tokens", "max_tokens") if settings.get(f"pooling_mode_{name}")]
        others = [key for key, value in settings.items() if key.startswith("pooling_mode_") and value
                  and key[len("pooling_mode_"):] not in ("cls_token", "mean_tokens", "max_tokens")]
        if len(chosen) != 1 or others:
            raise ModelLoadError(f"{path}: pooling {chosen + others} is not supported",
                                 hint="edgelm pools with exactly one of cls_token, mean_tokens, max_tokens")
        mode = {"cls_token": "cls", "mean_tokens": "mean", "max_tokens": "max"}[chosen[0]]
    unknown = set(kinds) - {"Transformer", "Pooling", "Normalize"}
    if unknown:
        raise ModelLoadError(f"{modules}: modules {sorted(unknown)} are not supported (only Transformer, Pooling, Normalize)",
                             hint="edgelm builds the transformer, its pooling and normalisation; export other modules yourself")
    config = folder / "sentence_bert_config.json"
    length = _json(config).get("max_seq_length") if config.is_file() else None
    return Pooling(mode=mode, normalize="Normalize" in kinds, max_seq_length=int(length) if length else None,
                   source="sentence-transformers (modules.json)")


def encoder_preflight(plan: Any, task: str) -> tuple[PreflightResult, EncoderInputs]:
    from edgelm.arch import encoder_for_config
    from edgelm.stages.adapt import read_adapters
    from edgelm.stages.load.model import check_tokenizer_file, locate_model, model_config

    folder, gguf_file = locate_model(plan.model)
    if gguf_file is not None:
        raise ConfigError(f"{folder / gguf_file}: a GGUF file holds a decoder; --task {task} needs an encoder folder",
                          hint="pass a Hugging Face encoder folder (BERT, RoBERTa, DistilBERT), or --task text-generation")
    if plan.profile.encoder is None:
        raise ConfigError(f"profile {plan.profile.name} has no encoder section: it builds decoders only",
                          hint="use a profile with an encoder section (edgelm profiles): cpu-fp32, cpu-int8, cpu-w8a8, "
                               "cpu-int4, gpu-fp16 or npu-qdq")
    config = model_config(plan.model)
    check_tokenizer_file(folder, None)
    arch = encoder_for_config(config, str(folder))
    refusal = arch.attention_refusal(config)
    if refusal and plan.profile.encoder.static_seq_len:
        raise ConfigError(f"{folder}: {arch.name} cannot build for {plan.profile.name} yet: {refusal}",
                          hint="use a dynamic-shape profile (cpu-fp32, cpu-int8, gpu-fp16, ...)")
    if plan.prune is not None:
        raise ConfigError("prune: pruning is for decoders; encoder builds do not prune yet", hint="leave out prune / --prune-mlp")
    adapters = read_adapters(plan.adapters)
    labels = _labels(config, task, adapters, folder, arch)
    pooling = read_pooling(folder) if task == "feature-extraction" else Pooling(normalize=False)
    if plan.quality.labelled_data is not None:
        read_labelled(Path(plan.quality.labelled_data), labels)
    result = PreflightResult(family=arch.name, context=arch.max_positions(config), adapters=len(adapters),
                             calibration=plan.calibration.source)
    return result, EncoderInputs(folder=folder, task=task, config=config, labels=labels, pooling=pooling)


def _labels(config: Any, task: str, adapters: list[Any], folder: Path, arch: Any) -> tuple[str, ...]:
    """id2label in id order; with a classifier adapter, the adapter folder's own config.json (its
    head's labels) or, failing that, its head's size with LABEL_i names."""
    if task == "feature-extraction":
        return ()
    for adapter in adapters:
        own = adapter.folder / "config.json"
        if own.is_file() and _json(own).get("id2label"):
            return tuple(label for _, label in sorted((int(i), v) for i, v in _json(own)["id2label"].items()))
        output_layer = arch.head_modules[-1] + ".weight"  # the head's last Linear: one row per label
        heads = [shape[0] for name, shape in adapter.shapes.items() if name.endswith(output_layer)]
        if heads:
            return tuple(f"LABEL_{i}" for i in range(heads[0]))
    architectures = getattr(config, "architectures", None) or []
    if not any(name.endswith(("ForSequenceClassification", "ForTokenClassification")) for name in architectures):
        raise ConfigError(f"{folder}: --task {task} needs a classification head, and this checkpoint has none "
                          f"(architectures {architectures})",
                          hint="train a head first (examples/train_encoder_lora.py), and pass its adapter with --adapter")
    return tuple(config.id2label[i] for i in range(len(config.id2label)))


def read_labelled(path: Path, labels: tuple[str, ...]) -> list[tuple[str, str]]:
    """quality.labelled_data: (text, label) pairs, every label one of the model's."""
    if not path.is_file():
        raise ConfigError(f"{path}: quality.labelled_data not found", hint="a .jsonl file of {\"text\": ..., \"label\": ...}")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            text, label = row["text"], row["label"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ConfigError(f"{path}:{number}: expected {{\"text\": ..., \"label\": ...}}",
                              hint="one JSON object per line") from None
        if not isinstance(text, str) or label not in labels:
            raise ConfigError(f"{path}:{number}: label {label!r} is not one of the model's labels {list(labels)}",
                              hint="use the labels the classifier was trained with")
        rows.append((text, label))
    if not rows:
        raise ConfigError(f"{path}: quality.labelled_data is empty", hint="one JSON object per line")
    return rows


def load_encoder(inputs: EncoderInputs) -> Any:
    """The fp32 model with the task's head, its attention routed through edgelm_mha (exported as
    MultiHeadAttention, export/encoder_attention.py) unless the family's attention needs more than
    a padding mask (arch.attention_refusal: eager attention); a classifier adapter's head size
    decides num_labels."""
    from edgelm.arch import encoder_for_config

    import contextlib
    import io

    import torch
    import transformers

    from edgelm.stages.export.encoder_attention import IMPLEMENTATION, register
    from edgelm.stages.load.model import _weights_error

    register()
    kwargs: dict[str, Any] = {}
    if inputs.task != "feature-extraction":
        kwargs = {"num_labels": len(inputs.labels), "id2label": dict(enumerate(inputs.labels)),
                  "label2id": {label: i for i, label in enumerate(inputs.labels)}}
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            model = getattr(transformers, _HEADS[inputs.task]).from_pretrained(
                inputs.folder, dtype=torch.float32, trust_remote_code=False, use_safetensors=True,
                attn_implementation="eager" if encoder_for_config(inputs.config).attention_refusal(inputs.config)
                else IMPLEMENTATION, **kwargs)
    except Exception as exc:
        raise _weights_error(inputs.folder, exc) from exc
    return model.eval()


class EncoderPreflight:
    name = "preflight"
    title = "Check the inputs (encoder, task, head, pooling, adapters)"

    def run(self, state: BuildState, progress: Progress) -> PreflightResult:
        from edgelm_runtime.hardware import host_features

        plan = state.plan
        result, state.encoder = encoder_preflight(plan, checkpoint_task(plan.model, plan.task, plan.adapters))
        state.build_host = host_features()
        return result


class LoadEncoder:
    name = "load"
    title = "Load encoder and tokenizer"

    def run(self, state: BuildState, progress: Progress) -> LoadResult:
        from transformers import AutoTokenizer

        from edgelm.arch import encoder_for_config
        from edgelm.stages.load.model import load_tokenizer, source_fingerprint

        inputs = state.encoder
        progress(self.name, 0, None, f"loading {inputs.folder.name}")
        state.model = load_encoder(inputs)
        state.tokenizer = load_tokenizer(AutoTokenizer, inputs.folder, None)
        arch = encoder_for_config(inputs.config)
        limits = [arch.max_positions(inputs.config), inputs.pooling.max_seq_length, state.plan.max_seq_len or DEFAULT_MAX_SEQ_LEN]
        state.max_seq_len = min(limit for limit in limits if limit)
        parameters = sum(p.numel() for p in state.model.parameters())
        state.source = {"path": str(inputs.folder), "format": "safetensors", "model_type": inputs.config.model_type,
                        "sha256": source_fingerprint(inputs.folder, None), "family": arch.name, "parameters": parameters}
        return LoadResult(model=inputs.folder.name, format="safetensors", model_type=inputs.config.model_type,
                          family=arch.name, parameters=parameters, layers=arch.sizes(inputs.config)[2],
                          max_seq_len=state.max_seq_len)


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: not found", hint="pass a folder saved with save_pretrained()") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path}: not valid JSON ({exc})", hint="re-save the model") from None
