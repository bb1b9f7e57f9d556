"""The bundle format: one folder, one `manifest.json` that says everything the runtime needs.

This module is the single source of truth for the format. The compiler (`edgelm`) writes
manifests with these classes, so writer and reader cannot drift. The runtime never guesses from
the ONNX graph: names, KV layout, eos ids and defaults all come from here. (Over 400 lines on
purpose: the whole contract, every section's fields and checks, stays in one module.)"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgelm_runtime.errors import BundleError
from edgelm_runtime.external_data import external_locations

# 6: `runtime_adapters` (LoRA adapters switched at run time); 5: `encoder` (encoder bundles; `kv` null); 4: `provider_options`; 3: `static` (fixed-shape NPU graphs)
# and `pruning`; 2: top-level `plan` and `adapters`
FORMAT_VERSION = 6

# The bundle's files, as the compiler writes them (the manifest names each, so the runtime reads
# whatever it lists; these are the names edgelm gives them).
MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.onnx"
DECODE_MODEL_FILE = "decode.onnx"  # static (NPU) bundles: the one-token decode graph beside model.onnx
TOKENIZER_FILE = "tokenizer.json"
CHAT_TEMPLATE_FILE = "templates/chat.jinja"
PROMPTS_FILE = "templates/prompts.json"


def external_data_file(model_file: str) -> str:
    """The one file beside a graph that holds its weights: model.onnx -> model.onnx.data."""
    return model_file + ".data"


MODEL_DATA_FILE = external_data_file(MODEL_FILE)
_UPGRADE_HINT = "upgrade the runtime: pip install -U edgelm-runtime"


@dataclass(frozen=True)
class ModelIO:
    """Graph input/output names. `{i}` in the KV names is the layer index.

    position_ids is None when the graph derives positions from the attention mask (GroupQueryAttention);
    logits_to_keep names an int64 [1] input that limits the logits to the last N positions, so a
    prompt's prefill computes the vocabulary projection once instead of once per token."""

    input_ids: str = "input_ids"
    attention_mask: str = "attention_mask"
    position_ids: str | None = "position_ids"
    logits_to_keep: str | None = None
    logits: str = "logits"
    past_key: str = "past_key_values.{i}.key"
    past_value: str = "past_key_values.{i}.value"
    present_key: str = "present.{i}.key"
    present_value: str = "present.{i}.value"

    def is_past(self, name: str) -> bool:
        """`name` is a past KV input of some layer (past_key_values.3.key, ...)."""
        return any(_is_layer_name(name, t) for t in (self.past_key, self.past_value))

    def is_kv(self, name: str) -> bool:
        """`name` is a past KV input or a present KV output of some layer."""
        return any(_is_layer_name(name, t) for t in (self.past_key, self.past_value, self.present_key, self.present_value))


def _is_layer_name(name: str, template: str) -> bool:
    """`name` is `template` with `{i}` a layer index."""
    prefix, _, suffix = template.partition("{i}")
    middle = name[len(prefix):len(name) - len(suffix)] if len(name) > len(prefix) + len(suffix) else ""
    return name.startswith(prefix) and name.endswith(suffix) and middle.isdigit()


@dataclass(frozen=True)
class KVLayout:
    """Shape of each past/present tensor: (batch, num_kv_heads, seq, head_dim).

    share_buffer: the attention op (GroupQueryAttention) accepts one buffer as both past and
    present, longer than the sequence, and appends in place; the attention mask says how much of
    it is valid. The runtime then preallocates the cache once per generation."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "float32"
    share_buffer: bool = False


@dataclass(frozen=True)
class StaticLayout:
    """Fixed-shape graphs for NPUs: `model_file` runs prefill chunks of exactly `prefill_len` tokens
    (the last one padded), `decode_model_file` one token; both attend to `kv_window` cache slots
    plus the new tokens, so `kv_window` is the context limit (the cache is capped, not slid).

    Inputs: input_ids and position_ids int32 (1, S); `attention_bias` float32 (1, 1, S, window + S),
    0 where a query may attend and `mask_value` elsewhere (empty slots, padding, the future); past
    KV (1, kv_heads, window, head_dim). The present outputs hold only the S new rows, which the
    runtime writes into its window at the sequence's length."""

    decode_model_file: str
    prefill_len: int
    kv_window: int
    attention_bias: str = "attention_bias"
    mask_value: float = -100.0  # exp(-100) is 0 in fp32, and a small range keeps 16-bit scores fine


ENCODER_TASKS = ("feature-extraction", "sequence-classification", "token-classification")
POOLINGS = ("mean", "cls", "max")


@dataclass(frozen=True)
class EncoderLayout:
    """An encoder bundle (BERT family): one graph, int64 inputs of shape (batch, seq) named in
    `inputs` (input_ids, attention_mask and, where the model has them, token_type_ids), and one
    float32 output `output`:
      feature-extraction      last_hidden_state (batch, seq, hidden_size); the runtime pools it
                              (`pooling` over the attention mask) and L2-normalises when `normalize`
      sequence-classification logits (batch, len(labels)); softmax, or a sigmoid per label when
                              `multi_label`
      token-classification    logits (batch, seq, len(labels)); `labels` in IOB2 (B-PER, I-PER, O)
    `labels` are the checkpoint's id2label in id order. `max_length` (tokens, special ones
    included) is the longest input the graph takes; `static_seq_len` fixes the sequence axis
    (NPU bundles): every input is padded to it."""

    task: str
    inputs: tuple[str, ...]
    output: str
    hidden_size: int
    max_length: int
    pad_token_id: int = 0
    pooling: str | None = None
    normalize: bool = False
    labels: tuple[str, ...] = ()
    multi_label: bool = False
    static_seq_len: int | None = None

    def __post_init__(self) -> None:
        for name in ("inputs", "labels"):  # JSON lists, kept as tuples
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.task not in ENCODER_TASKS:
            raise ValueError(f"encoder.task: {self.task!r} is not one of {', '.join(ENCODER_TASKS)}")
        if "input_ids" not in self.inputs or "attention_mask" not in self.inputs \
                or not set(self.inputs) <= {"input_ids", "attention_mask", "token_type_ids"}:
            raise ValueError(f"encoder.inputs: {list(self.inputs)} must be input_ids, attention_mask and "
                             "optionally token_type_ids")
        if self.task == "feature-extraction" and self.pooling not in POOLINGS:
            raise ValueError(f"encoder.pooling: {self.pooling!r} is not one of {', '.join(POOLINGS)}")
        if self.task != "feature-extraction" and not self.labels:
            raise ValueError(f"encoder.labels: a {self.task} bundle needs its labels")
        if self.static_seq_len is not None and not 1 <= self.static_seq_len <= self.max_length:
            raise ValueError(f"encoder.static_seq_len: {self.static_seq_len} must be between 1 and max_length")


@dataclass(frozen=True)
class GenerationDefaults:
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    prompt_lookup: int = 0  # SamplingParams.prompt_lookup's default: the profile's, where it is exact


ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class RuntimeAdapter:
    """A LoRA adapter the bundle switches at run time (edgelm_runtime.adapters): `file` is an
    onnxruntime adapter file (listed in `files`, so its size and sha256 are checked) whose tensors
    feed the graph's LoRA inputs; `targets` are the module paths it adapts; `source_sha256` is the
    PEFT adapter_model.safetensors it was made from; `quality` its numbers against the fp32 model
    with it merged (perplexity ratio, top-1 agreement, ...)."""

    name: str
    file: str
    sha256: str
    source_sha256: str
    rank: int
    targets: tuple[str, ...]
    weight: float = 1.0
    variant: str = "lora"
    alpha: float | None = None
    source: str | None = None
    quality: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(self.targets))
        if not ADAPTER_NAME.fullmatch(self.name):
            raise ValueError(f"name: {self.name!r} is not an adapter name (letters, digits, '.', '_', '-')")
        if not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            raise ValueError(f"sha256: {self.sha256[:20]!r} is not a sha256 hex digest")
        if not 1 <= self.rank <= 1 << 16:
            raise ValueError(f"rank: must be between 1 and {1 << 16} (got {self.rank})")


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int


@dataclass(frozen=True)
class Manifest:
    """Everything in `manifest.json`. Unknown keys are rejected so typos do not pass silently."""

    name: str
    profile: str
    provider: str
    model_file: str
    tokenizer_file: str
    kv: KVLayout | None  # None: an encoder bundle (`encoder` says what its graph computes)
    max_seq_len: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    io: ModelIO = ModelIO()
    bos_token: str | None = None
    eos_token: str | None = None
    chat_template_file: str | None = None
    prompt_templates_file: str | None = None
    session_options: dict[str, Any] = field(default_factory=dict)
    # execution provider name -> its options (e.g. {"CUDAExecutionProvider": {"device_id": 0}}), passed
    # to onnxruntime as (name, options) in InferenceSession's providers; a provider not listed gets none
    provider_options: dict[str, dict[str, str | int | float | bool]] = field(default_factory=dict)
    generation: GenerationDefaults = GenerationDefaults()
    quality: dict[str, Any] = field(default_factory=dict)
    # the resolved build plan (edgelm plan / edgelm build --from-bundle) and the LoRA adapters merged
    # into the weights: [{path, sha256, weight, merge_max_abs_diff, ...}]
    plan: dict[str, Any] = field(default_factory=dict)
    adapters: list[dict[str, Any]] = field(default_factory=list)
    # fused ops in the graph after the fuse stage (op type -> count), checked against the profile
    fusions: dict[str, int] = field(default_factory=dict)
    static: StaticLayout | None = None  # fixed-shape prefill + decode graphs (NPU profiles)
    encoder: EncoderLayout | None = None  # encoder bundles (embeddings, classification, NER)
    # what pruning removed: {kind, params_before, params_after, perplexity_before, ...} ({}: not pruned)
    pruning: dict[str, Any] = field(default_factory=dict)
    # LoRA adapters kept apart from the weights, chosen per request by name (format 6)
    runtime_adapters: tuple[RuntimeAdapter, ...] = ()
    provenance: dict[str, Any] = field(default_factory=dict)
    files: dict[str, FileEntry] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def task(self) -> str:
        """text-generation for decoder bundles, else the encoder's task."""
        return "text-generation" if self.encoder is None else self.encoder.task

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = MANIFEST_FILE) -> Manifest:
        if not isinstance(data, dict):
            raise BundleError(f"{source}: expected a JSON object", hint="rebuild the bundle")
        version = data.get("format_version")
        if not isinstance(version, int):
            raise BundleError(f"{source}: format_version is missing or not an integer",
                              hint="rebuild the bundle with edgelm build")
        if version > FORMAT_VERSION:
            raise BundleError(
                f"{source}: format_version {version} is newer than this runtime reads ({FORMAT_VERSION})",
                hint=_UPGRADE_HINT)
        try:
            fields = dict(data)
            if (fields["kv"] is None) == (fields.get("encoder") is None):
                raise ValueError("kv and encoder: a bundle has exactly one of them (a decoder's KV layout, "
                                 "or an encoder's layout)")
            if fields["kv"] is not None:
                fields["kv"] = _build(KVLayout, fields["kv"], "kv")
            else:
                fields["encoder"] = _build(EncoderLayout, fields["encoder"], "encoder")
            fields["io"] = _build(ModelIO, fields.get("io", {}), "io")
            fields["generation"] = _build(GenerationDefaults, fields.get("generation", {}), "generation")
            if fields.get("static") is not None:
                fields["static"] = _build(StaticLayout, fields["static"], "static")
            fields["files"] = {p: _build(FileEntry, e, f"files.{p}") for p, e in fields.get("files", {}).items()}
            fields["runtime_adapters"] = _runtime_adapters(fields.get("runtime_adapters", []))
            fields["eos_token_ids"] = tuple(int(i) for i in fields["eos_token_ids"])
            for name in ("past_key", "past_value", "present_key", "present_value"):
                template = getattr(fields["io"], name)
                try:
                    ok = "{i}" in template and template.format(i=0) != template.format(i=1)
                except (KeyError, IndexError, ValueError):
                    ok = False
                if not ok:
                    raise ValueError(f"io.{name}: {template!r} must name each layer with {{i}} and nothing else in braces")
            return _build(cls, fields, "")
        except KeyError as missing:
            raise BundleError(f"{source}: missing field {missing.args[0]}",
                              hint="rebuild the bundle with edgelm build") from None
        except (TypeError, ValueError, AttributeError) as exc:
            raise BundleError(f"{source}: {exc}", hint="rebuild the bundle with edgelm build") from None


def _runtime_adapters(entries: Any) -> tuple[RuntimeAdapter, ...]:
    if not isinstance(entries, (list, tuple)):  # a JSON list, or Manifest.to_dict()'s tuple
        raise TypeError("runtime_adapters: expected a list")
    built, seen = [], set()
    for index, entry in enumerate(entries):
        where = f"runtime_adapters.{index}"
        try:
            adapter = _build(RuntimeAdapter, entry, where)
        except ValueError as exc:  # __post_init__'s checks name the field, not the entry
            raise ValueError(f"{where}.{exc}") from None
        if adapter.name in seen:
            raise ValueError(f"{where}.name: duplicate adapter name {adapter.name!r}")
        seen.add(adapter.name)
        built.append(adapter)
    return tuple(built)


def _build(kind: type, values: Any, where: str) -> Any:
    """`kind(**values)` with every field's JSON type checked against its annotation, so a damaged
    manifest fails here, naming the field, and not deep inside onnxruntime or numpy."""
    if not isinstance(values, dict):
        raise TypeError(f"{where or 'manifest'}: expected an object")
    known = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise TypeError(f"{(where + '.') if where else ''}{unknown[0]}: unknown field")
    hints = typing.get_type_hints(kind)
    for name, value in values.items():
        if not _matches(value, hints[name]):
            raise TypeError(f"{(where + '.') if where else ''}{name}: expected {_describe(hints[name])}, "
                            f"got {type(value).__name__} {str(value)[:40]!r}")
    built = kind(**values)
    for name, limit in _SIZES.get(kind.__name__, {}).items():
        if not 1 <= getattr(built, name) <= limit:
            raise ValueError(f"{(where + '.') if where else ''}{name}: must be between 1 and {limit} "
                             f"(got {getattr(built, name)})")
    return built


# integer fields that size arrays: out of range, they fail later inside numpy or onnxruntime
_SIZES = {"KVLayout": {"num_layers": 4096, "num_kv_heads": 4096, "head_dim": 4096},
          "EncoderLayout": {"hidden_size": 1 << 16, "max_length": 1 << 16},
          "StaticLayout": {"prefill_len": 1 << 16, "kv_window": 1 << 22},
          "Manifest": {"max_seq_len": 1 << 22, "vocab_size": 1 << 22}}


def _matches(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in args)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if origin is tuple:
        return isinstance(value, (list, tuple)) and all(_matches(v, args[0]) for v in value)
    if origin is list:
        return isinstance(value, list) and all(_matches(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items())
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "").replace("NoneType", "None")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def describe_files(folder: Path) -> dict[str, FileEntry]:
    """sha256 and size of every file under `folder` except the manifest itself."""
    entries = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel != MANIFEST_FILE:
            entries[rel] = FileEntry(sha256=sha256_file(path), size=path.stat().st_size)
    return entries


def write_manifest(folder: Path, manifest: Manifest) -> Path:
    path = Path(folder) / MANIFEST_FILE
    path.write_text(json.dumps(manifest.to_dict(), indent=2, sort_keys=False) + "\n", encoding="utf-8")
    return path


def read_manifest(folder: str | Path) -> Manifest:
    folder = Path(folder)
    if not folder.is_dir():
        raise BundleError(f"{folder}: no such bundle folder", hint="build one with: edgelm build -o " + str(folder))
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise BundleError(f"{folder}: no {MANIFEST_FILE} in this folder",
                          hint="point to a folder written by edgelm build")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: not valid JSON ({exc})", hint="rebuild the bundle") from None
    return Manifest.from_dict(data, source=str(path))


def resolve_inside(folder: Path, relative: str, what: str) -> Path:
    """Resolve a manifest path, refusing any that leaves the bundle folder."""
    root = folder.resolve()
    if "\x00" in relative or not relative.strip():
        raise BundleError(f"{folder / MANIFEST_FILE}: {what} {relative!r} is not a file name",
                          hint="the manifest was tampered with; rebuild the bundle")
    target = (root / relative).resolve()
    if not target.is_relative_to(root):
        raise BundleError(f"{folder / MANIFEST_FILE}: {what} {relative!r} leaves the bundle folder",
                          hint="the manifest was tampered with; rebuild the bundle")
    return target


def verify_bundle(folder: str | Path, manifest: Manifest | None = None, check_hashes: bool = True) -> Manifest:
    """Check every listed file exists inside the folder with its recorded size (and sha256)."""
    folder = Path(folder)
    manifest = manifest or read_manifest(folder)
    static_file = manifest.static.decode_model_file if manifest.static else None
    adapter_files = tuple((f"runtime_adapters.{i}.file", a.file) for i, a in enumerate(manifest.runtime_adapters))
    for what, rel in adapter_files:
        resolve_inside(folder, rel, what)
    for what, rel in (("model_file", manifest.model_file), ("tokenizer_file", manifest.tokenizer_file),
                      ("chat_template_file", manifest.chat_template_file), ("static.decode_model_file", static_file),
                      *adapter_files):
        if rel is not None and rel not in manifest.files:
            raise BundleError(f"{folder / MANIFEST_FILE}: {what} {rel!r} is not listed in files",
                              hint="rebuild the bundle")
    for index, adapter in enumerate(manifest.runtime_adapters):
        if manifest.files[adapter.file].sha256 != adapter.sha256:
            raise BundleError(f"{folder / MANIFEST_FILE}: runtime_adapters.{index}.sha256 differs from files.{adapter.file}",
                              hint="the manifest was tampered with; rebuild the bundle")
    for rel, entry in manifest.files.items():
        path = resolve_inside(folder, rel, "file")
        if not path.is_file():
            raise BundleError(f"{folder}: {rel} is missing", hint="copy the whole bundle folder, or rebuild it")
        size = path.stat().st_size
        if size != entry.size:
            raise BundleError(f"{folder}: {rel} is {size} bytes, manifest says {entry.size}",
                              hint="the file is truncated or was replaced; copy the bundle again")
        if check_hashes and sha256_file(path) != entry.sha256:
            raise BundleError(f"{folder}: {rel} sha256 does not match the manifest",
                              hint="the file is corrupt or was replaced; copy the bundle again")
    graphs = dict.fromkeys([manifest.model_file, *([static_file] if static_file else []),
                            *(rel for rel in manifest.files if rel.endswith(".onnx"))])
    for rel in graphs:
        check_external_data(folder, rel, manifest)
    return manifest


_TAMPERED = "the bundle was tampered with; copy it again from where it was built, or rebuild it"


def check_external_data(folder: Path, graph: str, manifest: Manifest) -> None:
    """Every external-data location in the graph `graph` must name a file of the bundle that the
    manifest lists (so its size and sha256 are checked): never an absolute path, `..`, or a link
    that resolves outside the folder. onnxruntime would open it relative to the graph's folder;
    older onnxruntime releases follow any of those."""
    root = Path(folder).resolve()
    path = resolve_inside(Path(folder), graph, "model file")
    try:
        locations = external_locations(path)
    except (ValueError, OSError) as exc:
        raise BundleError(f"{folder}: {graph} is not a readable ONNX file ({exc})",
                          hint="the file is corrupt or was replaced; copy the bundle again, or rebuild it") from None
    listed = set(manifest.files)
    for location in dict.fromkeys(locations):
        where = f"{folder}: {graph}'s external data location {location!r}"
        if not location.strip() or "\x00" in location:
            raise BundleError(f"{where} is not a file name", hint=_TAMPERED)
        if location.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", location):
            raise BundleError(f"{where} is an absolute path", hint=_TAMPERED)
        if ".." in re.split(r"[/\\]", location):
            raise BundleError(f"{where} leaves the bundle folder", hint=_TAMPERED)
        try:
            target = (path.parent / location).resolve()
        except (OSError, ValueError):  # a name too long, a link loop
            raise BundleError(f"{where} is not a file name", hint=_TAMPERED) from None
        if not target.is_relative_to(root):
            raise BundleError(f"{where} resolves outside the bundle folder (a link?)", hint=_TAMPERED)
        if target.relative_to(root).as_posix() not in listed:
            raise BundleError(f"{where} is not a file listed in {MANIFEST_FILE}", hint=_TAMPERED)
