"""`edgelm eval`: a bundle against a reference, on held-out text and labelled tasks.

The bundle runs through edgelm_runtime (what apps run). The reference is another bundle, or a
PyTorch model in fp32 — by default the bundle's own source model, as recorded in its manifest —
so `edgelm eval dist/x` needs no other argument. Both see the same token ids."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgelm.errors import ConfigError, QualityGateError
from edgelm.eval.chat_fidelity import chat_fidelity, chat_gate_failures, held_out_prompt_ids
from edgelm.eval.metrics import compare
from edgelm.eval.task_data import TASK_NAMES, load_task
from edgelm.eval.tasks import task_accuracy
from edgelm.eval.text import eval_windows, fingerprint
from edgelm.pipeline.stage import Progress, no_progress
from edgelm_runtime.bundle import MANIFEST_FILE


class TorchModel:
    """A PyTorch causal LM behind the two calls the metrics use (same as a loaded bundle)."""

    def __init__(self, model: Any, eos_token_ids: Sequence[int] = ()) -> None:
        self.model = model
        self.eos = frozenset(eos_token_ids)  # the bundle's, so both stop where the runtime stops

    def greedy(self, prompt_ids: Sequence[int], tokens: int) -> tuple[list[int], bool]:
        """(the first `tokens` greedy tokens on the KV cache, whether eos came before them)."""
        import torch

        answer: list[int] = []
        with torch.no_grad():
            out = self.model(torch.tensor([list(prompt_ids)]), use_cache=True)
            while True:
                token = int(out.logits[0, -1].argmax())
                if token in self.eos:
                    return answer, True
                answer.append(token)
                if len(answer) == tokens:
                    return answer, False
                out = self.model(torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)

    def logits(self, input_ids: Sequence[int]) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.model(torch.tensor([list(input_ids)])).logits[0].float().numpy()

    def continuation_logprobs(self, prompt_ids: Sequence[int], continuations: Sequence[Sequence[int]]) -> list[np.ndarray]:
        import torch

        with torch.no_grad():
            out = self.model(torch.tensor([list(prompt_ids)]), use_cache=True)
            first = torch.log_softmax(out.logits[0, -1].double(), -1)
            scores = []
            for tokens in continuations:
                logprobs = [float(first[tokens[0]])]
                if len(tokens) > 1:  # the cache is extended in place: give each continuation its own copy
                    step = self.model(torch.tensor([list(tokens[:-1])]), past_key_values=copy.deepcopy(out.past_key_values),
                                      use_cache=True).logits[0].double()
                    rest = torch.log_softmax(step, -1)
                    logprobs += [float(rest[i, t]) for i, t in enumerate(tokens[1:])]
                scores.append(np.asarray(logprobs))
        return scores


def open_reference(spec: str | None, bundle_manifest: Any) -> tuple[Any, str]:
    """(model, description): a bundle folder, or a model path, or the bundle's recorded source —
    with the recorded LoRA adapters merged again (checked against their recorded sha256), so the
    default reference is the fp32 model the bundle was compressed from, not the bare base."""
    import edgelm_runtime

    if spec is not None and (Path(spec) / MANIFEST_FILE).is_file():
        return edgelm_runtime.load_bundle(spec), f"bundle {spec}"
    adapters = []
    if spec is None:
        spec = bundle_manifest.provenance.get("source", {}).get("path")
        if not spec:
            raise ConfigError(f"{bundle_manifest.name}: the manifest records no source model",
                              hint="pass --reference MODEL_OR_BUNDLE")
        adapters = bundle_manifest.adapters
    from edgelm.config.recipe import AdapterSpec
    from edgelm.stages.adapt import merge_adapters, read_adapters
    from edgelm.stages.load.model import load_pretrained

    model = load_pretrained(spec).model
    name = f"{Path(spec).name} (PyTorch fp32)"
    if adapters:
        specs = [AdapterSpec(path=a["path"], weight=a["weight"], sha256=a["sha256"]) for a in adapters]
        model, _ = merge_adapters(model, read_adapters(specs), probe=[[0]])
        name = f"{Path(spec).name} + {len(adapters)} adapter(s) (PyTorch fp32)"
    return TorchModel(model, bundle_manifest.eos_token_ids), name


def evaluate(bundle: str | Path, reference: str | None = None, windows: int = 8, window_len: int = 256,
             eval_text: str = "builtin", tasks: Sequence[str] = ("sentiment", "topic"), samples: int = 100,
             shots: Sequence[int] = (0, 3), seed: int = 0, progress: Progress = no_progress,
             provider: str | None = None, formats: Sequence[str] = ("plain",), selection: str = "round-robin",
             embedder: str | Path | None = None, chat_prompts: int = 32, chat_tokens: int = 32) -> dict[str, Any]:
    """`selection` of the few-shot examples: round-robin over the labels, or "nearest": the pool
    examples nearest each evaluated text by `embedder`'s embeddings (a feature-extraction bundle).
    `chat_prompts` held-out chat prompts (0: none) are answered greedily by both, `chat_tokens`
    each, for the chat-fidelity numbers (chat_fidelity.py)."""
    import edgelm_runtime
    from edgelm.eval.tasks import FORMATS, with_nearest_demos

    for asked, known, what in ((formats, FORMATS, "prompt format"), (tasks, TASK_NAMES, "task")):
        unknown = [name for name in asked if name not in known]
        if unknown:  # before anything loads
            raise ConfigError(f"unknown {what} {unknown[0]!r}", hint=f"use one of: {', '.join(known)}")

    picker = _embedder(selection, embedder)
    candidate = edgelm_runtime.load_bundle(bundle, provider=provider)
    progress("reference", 0, None, "loading the reference")
    ref_model, ref_name = open_reference(reference, candidate.manifest)
    encode = lambda text: candidate.tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    token_ids = eval_windows(eval_text, windows, window_len, encode)
    result: dict[str, Any] = {"bundle": candidate.manifest.name, "reference": ref_name}
    result.update(compare(candidate, ref_model, token_ids,
                          on_window=lambda i: progress("perplexity", i, len(token_ids), f"window {i}/{len(token_ids)}")))
    result.update({"windows": windows, "window_len": window_len, "windows_sha256": fingerprint(token_ids)})
    if chat_prompts:
        prompts = held_out_prompt_ids(candidate, chat_prompts, chat_tokens)
        result["chat"] = chat_fidelity(candidate, ref_model, prompts, chat_tokens,
                                       on_prompt=lambda i: progress("chat", i, len(prompts), f"prompt {i}/{len(prompts)}"))
    result["tasks"] = {}
    scorers = (candidate.continuation_logprobs, ref_model.continuation_logprobs)
    for name in tasks:
        task = load_task(name, samples, seed)
        if picker is not None:
            task = with_nearest_demos(task, picker)
        for k in shots:
            for fmt in formats:  # the plain format keeps the bare key (sentiment-0shot)
                key = f"{name}-{k}shot" + ("" if fmt == "plain" else f"-{fmt}") + ("-nearest" if picker and k else "")
                accuracy, reference_accuracy = task_accuracy(
                    task, k, encode, scorers, candidate.manifest.max_seq_len, fmt, candidate.render_chat,
                    on_example=lambda i: progress(key, i, len(task.examples), f"{i}/{len(task.examples)}"))
                # accuracy: what classify() decides by default (scoring.label_convention); by_scoring: every convention
                result["tasks"][key] = {
                    "accuracy": round(accuracy["default"], 4),
                    "reference_accuracy": round(reference_accuracy["default"], 4),
                    "n": len(task.examples), "scoring": "default", "format": fmt,
                    "selection": selection if k else None,
                    "by_scoring": {scoring: {"accuracy": round(accuracy[scoring], 4),
                                             "reference_accuracy": round(reference_accuracy[scoring], 4)}
                                   for scoring in accuracy if scoring != "default"}}
    return result


SELECTIONS = ("round-robin", "nearest")


def _embedder(selection: str, embedder: str | Path | None) -> Any:
    """The feature-extraction bundle that chooses few-shot examples ("nearest"), checked up front."""
    import edgelm_runtime

    if selection not in SELECTIONS:
        raise ConfigError(f"unknown few-shot selection {selection!r}", hint=f"use one of: {', '.join(SELECTIONS)}")
    if selection == "round-robin":
        if embedder is not None:
            raise ConfigError("--embedder is only used by --selection nearest", hint="add --selection nearest")
        return None
    if embedder is None:
        raise ConfigError("--selection nearest needs --embedder BUNDLE (a feature-extraction bundle)",
                          hint="build one: edgelm build --profile cpu-int8 --model path/to/all-MiniLM-L6-v2 -o dist/minilm")
    model = edgelm_runtime.load_bundle(embedder)
    if model.manifest.task != "feature-extraction":
        raise ConfigError(f"{embedder}: --embedder needs a feature-extraction bundle, not {model.manifest.task}",
                          hint="build one with edgelm build --task feature-extraction")
    return model


def gate_misses(result: dict[str, Any], gates: Any, max_accuracy_drop: float | None = None) -> list[str]:
    """The gates `result` misses, with the numbers (`gates` has the quality.* fields);
    `max_accuracy_drop` is in accuracy points (0.01 = one point) per task."""
    from edgelm.eval.metrics import gate_failures

    failures = gate_failures(result, gates) + chat_gate_failures(result.get("chat"), gates)
    if max_accuracy_drop is not None:
        for name, task in result["tasks"].items():
            drop = task["reference_accuracy"] - task["accuracy"]
            if drop > max_accuracy_drop + 1e-9:
                failures.append(f"{name} accuracy {task['accuracy']:.3f} vs {task['reference_accuracy']:.3f} "
                                f"(drop {drop:.3f} > {max_accuracy_drop})")
    return failures


def check_gates(result: dict[str, Any], gates: Any, max_accuracy_drop: float | None = None) -> None:
    """Raise QualityGateError with the numbers when `result` misses a gate (see gate_misses)."""
    raise_missed(result["bundle"], gate_misses(result, gates, max_accuracy_drop))


def raise_missed(bundle_name: str, failures: Sequence[str]) -> None:
    if failures:
        raise QualityGateError("eval", f"{bundle_name}: " + "; ".join(failures),
                               hint="rebuild with a higher-precision profile or --accuracy-budget, or relax the gate")
