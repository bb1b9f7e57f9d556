"""Calibration feeds for static quantization, streamed one at a time (bounded memory).

Each sample gives one prefill feed (empty KV cache) and then `decode_steps` decode feeds with a
growing KV cache, produced by the fp32 model continuing the sample greedily — so activation ranges
cover both shapes the bundle runs, and the decode steps see the model's own distribution.
Default samples are prompts shipped with edgelm (no download, nothing to install)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from edgelm.errors import ConfigError, ModelLoadError
from edgelm.onnx_graph import reference_session
from edgelm.stages.export.decoder import decoder_feed, io_names


def builtin_prompts() -> list[str]:
    text = resources.files("edgelm.data").joinpath("calibration_prompts.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def read_calibration_file(path: Path) -> list[str]:
    """A .txt file (one sample per line) or .jsonl (one object with a "text" field per line)."""
    if not path.is_file():
        raise ConfigError(f"{path}: calibration file not found", hint="pass an existing .txt or .jsonl file to --calibration")
    if path.suffix not in (".txt", ".jsonl"):
        raise ConfigError(f"{path}: calibration file must be .txt or .jsonl", hint="one sample per line (.txt) or {\"text\": ...} per line (.jsonl)")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: calibration file is not UTF-8 text", hint="re-encode it as UTF-8") from None
    samples = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                record = json.loads(line)
                line = record["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ConfigError(f"{path}:{number}: expected a JSON object with a \"text\" field",
                                  hint='write one {"text": "..."} object per line') from None
            if not isinstance(line, str):
                raise ConfigError(f"{path}:{number}: \"text\" must be a string", hint='write one {"text": "..."} object per line')
        samples.append(line.strip())
    if not samples:
        raise ConfigError(f"{path}: calibration file has no samples", hint="add at least one non-empty line")
    return samples


def calibration_texts(source: str, tokenizer: Any, chat_template: str | None, samples: int) -> list[str]:
    """The texts to calibrate on: builtin prompts (half of them in the model's chat format)."""
    if source != "builtin":
        texts = read_calibration_file(Path(source))
    else:
        texts = []
        chat = chat_renderer(tokenizer, chat_template) if chat_template else None
        for i, prompt in enumerate(builtin_prompts()):
            texts.append(chat(prompt) if chat is not None and i % 2 == 0 else prompt)
    return [texts[i % len(texts)] for i in range(samples)] if len(texts) < samples else texts[:samples]


def chat_renderer(tokenizer: Any, chat_template: str) -> Callable[[str], str]:
    """One user prompt in the model's chat format, rendered the way the bundle will render it: by the
    runtime's ChatTemplate (sandboxed, with its time and size limits), not by transformers'
    apply_chat_template, which has no limits (a hostile template would hang or swamp the build).
    A template that fails there fails the build in one line naming its file."""
    from edgelm_runtime.errors import TemplateError
    from edgelm_runtime.templates import ChatTemplate

    def failed(exc: TemplateError) -> ModelLoadError:
        return ModelLoadError(exc.message, hint="the model's chat template is broken or hostile (edgelm renders it "
                                                "with the runtime's sandbox and limits); fix or remove it, then rebuild")

    try:
        template = ChatTemplate(chat_template, template_origin(tokenizer), tokenizer.bos_token, tokenizer.eos_token)
    except TemplateError as exc:
        raise failed(exc) from None

    def render(prompt: str) -> str:
        try:
            return template.render([{"role": "user", "content": prompt}], add_generation_prompt=True)
        except TemplateError as exc:
            raise failed(exc) from None

    return render


def template_origin(tokenizer: Any) -> str:
    """Where the tokenizer's chat template came from, as transformers looks for it (for error messages)."""
    folder = Path(str(getattr(tokenizer, "name_or_path", "") or "."))
    if (folder / "chat_template.jinja").is_file():
        return str(folder / "chat_template.jinja")
    for name in ("chat_template.json", "tokenizer_config.json"):
        try:
            if "chat_template" in json.loads((folder / name).read_text(encoding="utf-8")):
                return f"{folder / name} (chat_template)"
        except (OSError, ValueError, TypeError):
            continue
    return f"{folder} (chat template)"


def calibration_token_ids(source: str, tokenizer: Any, chat_template: str | None, samples: int,
                          max_tokens: int) -> list[list[int]]:
    """Token ids of the calibration texts, each cut to `max_tokens`; empty samples dropped."""
    texts = calibration_texts(source, tokenizer, chat_template, samples)
    encoded = (tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts)
    return [ids[:max_tokens] for ids in encoded if ids]


def plan_token_ids(state: Any) -> list[list[int]]:
    """The build's calibration samples (its plan's `calibration`), as the torch-side passes read them."""
    calibration = state.plan.calibration
    return calibration_token_ids(calibration.source, state.tokenizer, state.chat_template, calibration.samples,
                                 calibration.max_prompt_tokens)


def observe_linear_inputs(model: Any, token_ids: list[list[int]], observe: Callable[[str, Any], None],
                          on_sample: Callable[[int], None] = lambda i: None) -> None:
    """Run the PyTorch model on calibration token ids and hand every decoder Linear's input to
    `observe(path, x)` (path: the family's module path under the layers' parent, "layers.3.<path>",
    as `DecoderArch.layer_linears` names it; x as fp32 (tokens, features)): the activation
    statistics SmoothQuant and pruning both need, gathered by one set of hooks."""
    import torch

    from edgelm.arch import for_model

    def hook(path: str):
        return lambda module, inputs: observe(path, inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float())

    hooks = [module.register_forward_pre_hook(hook(path)) for path, module in for_model(model).layer_linears(model).items()]
    try:
        with torch.no_grad():
            for i, ids in enumerate(token_ids):
                model(torch.tensor([ids]), use_cache=False)
                on_sample(i + 1)
    finally:
        for handle in hooks:
            handle.remove()


class _FeedStream:
    """onnxruntime's CalibrationDataReader over `self._feeds` (an iterator): get_next() -> feed or None."""

    _stop: float = float("inf")

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.count >= self._stop:
            return None
        feed = next(self._feeds, None)
        if feed is not None:
            self.count += 1
            self._on_feed(self.count)
        return feed


class CalibrationFeeds(_FeedStream):
    """onnxruntime CalibrationDataReader: get_next() -> feed dict, or None when done.

    `len()` and `set_range()` let quantize_static collect in chunks (its CalibStridedMinMax
    option): histogram calibrators keep every intermediate output of one collect_data call in
    memory, so edgelm hands them one feed at a time and the histograms merge."""

    def __init__(self, reference_onnx: Path, token_ids: list[list[int]], kv: tuple[int, int, int],
                 decode_steps: int, on_feed: Callable[[int], None] = lambda n: None) -> None:
        self._session = reference_session(str(reference_onnx))
        self._kv = kv
        self._decode_steps = decode_steps
        self._feeds = self._generate(token_ids)
        self._on_feed = on_feed
        self.count = 0
        self._total = len(token_ids) * (decode_steps + 1)
        self._stop = self._total

    def __len__(self) -> int:
        return self._total

    def set_range(self, start_index: int, end_index: int) -> None:
        """The next get_next() calls yield feeds [start_index, end_index); chunks come in order."""
        if start_index != self.count:
            raise ValueError(f"calibration chunks must come in order (next feed {self.count}, asked {start_index})")
        self._stop = end_index


    def _generate(self, token_ids: list[list[int]]) -> Iterator[dict[str, np.ndarray]]:
        num_layers, kv_heads, head_dim = self._kv
        _, past_names, _, _ = io_names(num_layers)
        names = {i.name for i in self._session.get_inputs()}
        for ids in token_ids:
            past = {n: np.zeros((1, kv_heads, 0, head_dim), np.float32) for n in past_names}
            step = np.asarray([ids], np.int64)
            for position in range(self._decode_steps + 1):
                feed = decoder_feed(names, step, past)
                yield feed
                if position == self._decode_steps:
                    break
                logits, *present = self._session.run(None, feed)
                past = dict(zip(past_names, present))
                step = np.asarray([[int(logits[0, -1].argmax())]], np.int64)


class StaticCalibrationFeeds(_FeedStream):
    """Calibration feeds for one of the two fixed-shape graphs (`kind` "prefill" or "decode"),
    recorded while the fp32 graphs run each sample the way the runtime will: its prompt in prefill
    chunks, then `decode_steps` greedy decode steps. Streamed one sample at a time (a sample's
    feeds carry the whole KV window, ~24 MB each on SmolLM2)."""

    def __init__(self, graphs: Any, token_ids: list[list[int]], kv: tuple[int, int, int], decode_steps: int,
                 kind: str, on_feed: Callable[[int], None] = lambda n: None) -> None:
        from edgelm_runtime.static import open_static_sessions

        self._sessions = open_static_sessions(graphs.prefill, graphs.decode)
        self._graphs, self._kv, self._decode_steps, self._kind = graphs, kv, decode_steps, kind
        self._feeds = self._generate(token_ids)
        self._on_feed = on_feed
        self.count = 0

    def _generate(self, token_ids: list[list[int]]) -> Iterator[dict[str, np.ndarray]]:
        from edgelm_runtime.static import StaticWindow

        num_layers, kv_heads, head_dim = self._kv
        layout = self._graphs.layout
        prefill, decode = self._sessions
        for ids in token_ids:
            recorded: list[dict[str, np.ndarray]] = []  # only this graph's feeds are copied
            if self._kind == "prefill":
                prefill = _Recorder(self._sessions[0], recorded)
            else:
                decode = _Recorder(self._sessions[1], recorded)
            window = StaticWindow(prefill, decode, layout, num_layers, kv_heads, head_dim, np.float32)
            steps = min(self._decode_steps, layout.kv_window - len(ids))
            logits = window.feed(np.asarray(ids[: layout.kv_window - steps]))
            for _ in range(steps):
                logits = window.feed(np.asarray([int(logits.argmax())]))
            yield from recorded


class _Recorder:
    """An onnxruntime session that keeps a copy of every feed it runs (the window changes in place)."""

    def __init__(self, session: Any, sink: list[dict[str, np.ndarray]]) -> None:
        self._session, self._sink = session, sink

    def run(self, names: Any, feed: dict[str, np.ndarray]) -> Any:
        self._sink.append({name: value.copy() for name, value in feed.items()})
        return self._session.run(names, feed)
