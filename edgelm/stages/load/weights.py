"""What a model folder really holds, read before any module is built: which files the weights
come from, that none lies outside the folder, that no file asks to run the folder's Python code,
and that the config's sizes are the weights' sizes (from the safetensors headers or the GGUF
tensor table, never the tensor data).

A config that disagrees with its weights is refused here, in a second: transformers would first
build every module the config describes (1,000,000 layers took minutes and gigabytes) and then
fail, or load a model with layers silently left out. `source_files` lists exactly the files a
build reads, which the bundle's source fingerprint (provenance.source.sha256) covers."""

from __future__ import annotations

import json
import math
import logging
import re
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from edgelm.arch.base import CHECKPOINT_TENSORS
from edgelm.errors import ModelLoadError

logger = logging.getLogger(__name__)

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
CODE_FILES = ("config.json", "tokenizer_config.json")  # where transformers reads auto_map
# besides the weights, what transformers reads from a folder for the model, its generation
# defaults and a fast tokenizer with its chat template
_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json")
_MAX_HEADER = 100_000_000  # the safetensors format's own limit on its JSON header
_SIZE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                "num_key_value_heads")
# tensor names per layout: embedding, a layer's index, the first layer's down / q / k / packed qkv projections
# (a Hugging Face checkpoint's: edgelm.arch.base.CHECKPOINT_TENSORS; a GGUF's: llama.cpp's names)
_GGUF_KEYS = {"num_hidden_layers": "block_count", "vocab_size": "vocab_size", "hidden_size": "embedding_length",
              "intermediate_size": "feed_forward_length", "num_attention_heads": "attention.head_count",
              "num_key_value_heads": "attention.head_count_kv"}
_GGUF_NAMES = ("token_embd.weight", re.compile(r"^blk\.(\d+)\."),
               ("ffn_down.weight", "attn_q.weight", "attn_k.weight", "attn_qkv.weight"))


def refuse_custom_code(folder: Path) -> None:
    """`auto_map` in config.json or tokenizer_config.json names Python files of the folder that
    transformers imports when trusted. edgelm never trusts them (trust_remote_code=False): where
    the model's type (or the tokenizer's class) is one transformers ships, transformers uses its own
    class and the auto_map is ignored (Phi-3's releases carry one); anywhere else it is refused."""
    from edgelm.arch import ARCHS

    config = _json(folder / "config.json")
    model_type = config.get("model_type") if isinstance(config, dict) else None
    for name in CODE_FILES:
        data = config if name == "config.json" else (_json(folder / name) if (folder / name).is_file() else {})
        if not isinstance(data, dict) or "auto_map" not in data:
            continue
        if model_type in ARCHS and (name == "config.json" or _native_tokenizer(data.get("tokenizer_class"))):
            logger.info("%s: auto_map ignored: transformers' own %s classes are used", folder / name, model_type)
            continue
        classes = data["auto_map"] if isinstance(data["auto_map"], dict) else {}
        raise ModelLoadError(
            f"{folder / name}: auto_map asks to run the model folder's own Python code"
            f"{' (' + ', '.join(sorted(map(str, classes))) + ')' if classes else ''}",
            hint=f"edgelm never runs model-folder code; use a model whose architecture transformers ships "
                 f"(edgelm builds {', '.join(ARCHS)})")


def _native_tokenizer(name: Any) -> bool:
    """No tokenizer_class (the model type's own is used), or one transformers has."""
    if name is None:
        return True
    try:
        from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

        return isinstance(name, str) and tokenizer_class_from_name(name) is not None
    except Exception:  # another transformers layout, or a name it cannot look up
        return False


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files transformers loads from `folder` (model.safetensors, else every shard
    the index names), each refused unless it lies inside the folder."""
    if (folder / SAFE_WEIGHTS).is_file():
        return [_inside(folder, SAFE_WEIGHTS, folder)]
    index = folder / SAFE_INDEX
    if not index.is_file():
        return sorted(folder.glob("*.safetensors"))  # transformers will say what it misses
    _inside(folder, SAFE_INDEX, folder)
    data = _json(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ModelLoadError(f"{index}: no weight_map of tensor name -> shard file name",
                             hint="re-save the model with save_pretrained(), which writes the index")
    return [_inside(folder, name, index) for name in dict.fromkeys(weight_map.values())]


def source_files(folder: Path, gguf_file: str | None) -> list[Path]:
    """Every file a build reads from the model: the GGUF alone (it holds the tokenizer too), or the
    weights, the index, the config and the tokenizer files."""
    if gguf_file:
        return [folder / gguf_file]
    extra = [folder / SAFE_INDEX] if not (folder / SAFE_WEIGHTS).is_file() and (folder / SAFE_INDEX).is_file() else []
    return weight_files(folder) + extra + [folder / name for name in _SIDE_FILES if (folder / name).is_file()]


def parameter_count(folder: Path, gguf_file: str | None) -> int:
    """Weights in the checkpoint, read from the tensor tables alone (no data): what a build of
    it will hold in fp32 (edgelm/matrix/resources.py sizes a build's memory from it)."""
    if gguf_file:
        from edgelm.stages.load.gguf_config import tensor_shapes

        shapes = tensor_shapes(folder / gguf_file)
    else:
        shapes = {name: shape for path in weight_files(folder) for name, shape in _header(path).items()}
    return sum(math.prod(shape) for shape in shapes.values())


def check_sizes(folder: Path, gguf_file: str | None, config: Any) -> None:
    """Refuse a config whose sizes are not the weights' (one line: the field and both numbers)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if gguf_file:
        from edgelm.stages.load.gguf_config import tensor_shapes

        where, shapes, names = folder / gguf_file, tensor_shapes(folder / gguf_file), _GGUF_NAMES
        hint = "the file's metadata does not match its tensors; convert the model again (llama.cpp's " \
               "convert_hf_to_gguf.py) or download the file again"
    else:
        where, names = folder / "config.json", CHECKPOINT_TENSORS
        shapes = {name: shape for path in weight_files(folder) for name, shape in _header(path).items()}
        hint = "config.json does not belong to these weights; use the config.json saved with them " \
               "(save_pretrained writes both)"
    for field in _SIZE_FIELDS:
        value = getattr(config, field, None)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ModelLoadError(f"{where}: {field} is {value!r}; it must be a positive whole number", hint=hint)
    problem = _mismatch(config, shapes, *names)
    if problem and gguf_file:  # the GGUF's own metadata key, then the config field it became
        field, rest = problem.split(" ", 1)
        problem = f"{_GGUF_KEYS.get(field, field)} ({field}) {rest}"
    if problem:
        raise ModelLoadError(f"{where}: {problem}", hint=hint)


def _mismatch(config: Any, shapes: dict[str, tuple[int, ...]], embed_name: str, layer: re.Pattern,
              projections: tuple[str, ...]) -> str | None:
    found = {int(m.group(1)): name[:m.start(1)].lstrip(".") for name in shapes if (m := layer.search(name))}
    layers = sorted(found)
    first = {suffix: shape for name, shape in shapes.items() for suffix in projections
             if name.endswith("." + suffix) and (m := layer.search(name)) and int(m.group(1)) == layers[0]}
    wanted = getattr(config, "num_hidden_layers", None)
    if layers and wanted is not None and wanted != layers[-1] + 1:
        return f"num_hidden_layers is {wanted} but the weights hold {layers[-1] + 1} layers ({found[layers[-1]]}0-{layers[-1]})"
    embed = next((shape for name, shape in shapes.items() if name.endswith(embed_name) and len(shape) == 2), None)
    hidden = getattr(config, "hidden_size", None)
    if embed is not None:
        if getattr(config, "vocab_size", None) not in (None, embed[0]):
            return f"vocab_size is {config.vocab_size} but the weights' {embed_name} has {embed[0]} rows"
        if hidden not in (None, embed[1]):
            return f"hidden_size is {hidden} but the weights' {embed_name} has {embed[1]} columns"
    down, q, k, qkv = (first.get(suffix) for suffix in projections)
    intermediate = getattr(config, "intermediate_size", None)
    if down is not None and len(down) == 2 and isinstance(intermediate, int) and intermediate != down[1]:
        return f"intermediate_size is {intermediate} but the weights' {projections[0]} has {down[1]} columns"
    heads, kv_heads = getattr(config, "num_attention_heads", None), getattr(config, "num_key_value_heads", None)
    if not heads or not hidden:
        return None
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_heads = kv_heads or heads
    checks = [(q, heads * head_dim, "num_attention_heads x head_dim", projections[1]),
              (k, kv_heads * head_dim, "num_key_value_heads x head_dim", projections[2]),
              (qkv, (heads + 2 * kv_heads) * head_dim, "(num_attention_heads + 2 x num_key_value_heads) x head_dim",
               projections[3])]
    for shape, expected, what, name in checks:
        if shape is not None and len(shape) == 2 and shape[0] != expected:
            return f"{what} is {expected} but the weights' {name} has {shape[0]} rows"
    return None


def _header(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors file's JSON header (8-byte length, then the JSON)."""
    hint = "the file is truncated or not a safetensors file; re-download the model or re-save it (save_pretrained)"
    try:
        with open(path, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            size = path.stat().st_size
            if size < 8 or not 0 < length <= min(_MAX_HEADER, size - 8):
                raise ValueError(f"header length {length} in a {size}-byte file")
            header = json.loads(handle.read(length))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        return {name: tuple(int(n) for n in entry["shape"]) for name, entry in header.items()
                if name != "__metadata__"}
    except (OSError, ValueError, KeyError, TypeError) as exc:  # JSONDecodeError is a ValueError
        raise ModelLoadError(f"{path}: cannot load weights (unreadable safetensors header: {str(exc)[:120]})",
                             hint=hint) from None


def _inside(folder: Path, name: str, source: Path) -> Path:
    """folder / name, refused when `name` is absolute, climbs out with `..`, or is a link that
    resolves outside the folder (a Hugging Face cache snapshot's links into its blobs/ are fine)."""
    hint = "edgelm reads weights only from inside the model folder: put the shards there and list them by file name"
    if not name or "\x00" in name or PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute() \
            or PureWindowsPath(name).drive or ".." in re.split(r"[/\\]", name):
        raise ModelLoadError(f"{source}: weight file {name!r} is outside the model folder", hint=hint)
    path = folder / name
    resolved = path.resolve()
    roots = [folder.resolve()]
    if folder.parent.name == "snapshots":  # models--org--name/snapshots/<commit>/ links into ../../blobs/
        roots.append((folder.parent.parent / "blobs").resolve())
    if not any(resolved.is_relative_to(root) for root in roots):
        raise ModelLoadError(f"{source}: weight file {name!r} links outside the model folder (to {resolved})", hint=hint)
    return path


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelLoadError(f"{path}: not valid JSON ({str(exc)[:120]})",
                             hint="the file is truncated or was edited by hand; re-download or re-save the model") from None
