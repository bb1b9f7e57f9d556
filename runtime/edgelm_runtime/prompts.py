"""Zero/few-shot prompt templates stored in a bundle (`templates/prompts.json`).

Two kinds. A `classify` template turns a text into a prompt whose continuation is one of its
labels; the label is chosen by scoring each label's tokens after the prompt (length-normalised
log-likelihood), never by parsing generated text. Few-shot examples are placed before the query,
either the caller's or k of the template's own, taken round-robin over the labels (deterministic).
A `generate` template is free text with named `{variables}` (extraction, QA, summaries), run
through the model's generation with the template's stop strings.

Placeholders are plain names; values are inserted as they are (never re-parsed), and a missing or
unknown variable is a TemplateError naming the template and the variable. The compiler writes
these files from YAML; the runtime reads only JSON."""

from __future__ import annotations

import json
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgelm_runtime.errors import BundleError, TemplateError
from edgelm_runtime.scoring import SCORINGS

PROMPTS_FORMAT = 1
# classify() without a template name. Chosen by measurement (benchmarks/classify_templates.py,
# docs/zero-shot.md): listing the labels in an instruction first, or asking in a chat turn, cost
# SmolLM2 up to 28 points on topic and multiple choice.
DEFAULT_CLASSIFY = {"kind": "classify", "query": "Text: {text}\nLabel:"}


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    kind: str                          # "classify" or "generate"
    query: str = ""                    # classify: the example/query block, with {text} (and {label} is appended)
    instruction: str = ""              # classify: optional text before the examples; may use {labels}
    labels: tuple[str, ...] = ()       # classify: default labels
    examples: tuple[tuple[str, str], ...] = ()  # classify: few-shot pool of (text, label)
    shots: int = 0                     # classify: how many pool examples to use by default
    separator: str = "\n\n"            # classify: between examples
    scoring: str | None = None         # classify: the scoring convention it wants (None: scoring.label_convention)
    chat: bool = False                 # classify: ask in a user turn of the chat template; the label is the reply
    calibrate: bool | None = None      # classify: contextual calibration by default (None: scoring.label_convention)
    template: str = ""                 # generate: the prompt, with {variables}
    stop: tuple[str, ...] = ()         # generate: stop strings
    max_new_tokens: int | None = None  # generate: default length
    json_schema: dict[str, Any] | None = None  # generate: the output follows this JSON schema (constrained)
    json_keys: str = ""                # generate: the output is an object keyed by this variable's comma-separated names
    description: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("classify", "generate"):
            raise TemplateError(f"template {self.name!r}: kind {self.kind!r} is not classify or generate",
                                hint="fix the templates file and rebuild")
        if self.kind == "classify":
            _check_fields(self.name, "query", self.query, {"text"}, required={"text"})
            _check_fields(self.name, "instruction", self.instruction, {"labels"})
            if self.scoring is not None and self.scoring not in SCORINGS:
                raise TemplateError(f"template {self.name!r}: scoring {self.scoring!r} is not a scoring convention",
                                    hint=f"use one of: {', '.join(SCORINGS)}")
            for text, label in self.examples:
                if self.labels and label not in self.labels:
                    raise TemplateError(f"template {self.name!r}: example label {label!r} is not one of its labels",
                                        hint=f"use one of: {', '.join(self.labels)}")
        else:
            _check_fields(self.name, "template", self.template, None)
            if self.json_keys and self.json_keys not in self.variables:
                raise TemplateError(f"template {self.name!r}: json_keys {self.json_keys!r} is not one of its variables",
                                    hint=f"use one of: {', '.join(self.variables) or 'none'}")
            if self.json_keys and self.json_schema is not None:
                raise TemplateError(f"template {self.name!r}: json_schema and json_keys both given",
                                    hint="declare one of them")

    @property
    def variables(self) -> list[str]:
        return _fields(self.template if self.kind == "generate" else self.query)

    def render(self, **values: Any) -> str:
        """The prompt of a generate template with every variable filled."""
        if self.kind != "generate":
            raise TemplateError(f"template {self.name!r} is a classify template",
                                hint=f"use llm.classify(text, template={self.name!r})")
        return _fill(self.name, self.template, values)

    def output_schema(self, **values: Any) -> dict[str, Any] | None:
        """The JSON schema a generate template's output follows (None: free text): its own, or an
        object whose keys are the `json_keys` variable's names, each a string or null."""
        if not self.json_keys:
            return self.json_schema
        keys = [key.strip() for key in str(values.get(self.json_keys, "")).split(",") if key.strip()]
        if not keys:
            raise TemplateError(f"template {self.name!r}: {self.json_keys} names no keys",
                                hint=f'pass {self.json_keys}="name, city", say')
        return {"type": "object", "additionalProperties": False, "required": keys,
                "properties": {key: {"type": ["string", "null"]} for key in keys}}

    def classify_prompt(self, text: str, labels: Sequence[str],
                        examples: Sequence[tuple[str, str]] | None = None, shots: int | None = None) -> str:
        """Instruction, few-shot examples, then the query for `text`, ending where a label goes."""
        parts = [self._instruction(labels)] if self.instruction else []
        parts += [_fill(self.name, self.query, {"text": t}) + " " + label for t, label in self._demos(labels, examples, shots)]
        parts.append(_fill(self.name, self.query, {"text": text}))
        return self.separator.join(parts)

    def classify_messages(self, text: str, labels: Sequence[str], examples: Sequence[tuple[str, str]] | None = None,
                          shots: int | None = None) -> list[dict[str, str]]:
        """The chat form of classify_prompt: each few-shot example a user turn (the instruction
        leads the first) answered by an assistant turn holding its label, then the query's turn."""
        lead = self._instruction(labels) + self.separator if self.instruction else ""
        messages = []
        for t, label in [*self._demos(labels, examples, shots), (text, None)]:
            messages.append({"role": "user", "content": lead + _fill(self.name, self.query, {"text": t})})
            lead = ""
            if label is not None:
                messages.append({"role": "assistant", "content": label})
        return messages

    def classify_input(self, text: str, labels: Sequence[str], examples: Sequence[tuple[str, str]] | None = None,
                       shots: int | None = None, render_chat: Callable[[list[dict[str, str]]], str] | None = None,
                       ) -> tuple[str, str]:
        """(prompt, what goes before each label) as classify() scores them: classify_prompt and a
        space, or for a chat template classify_messages rendered by `render_chat` and no space (the
        label starts the reply)."""
        if not self.chat:
            return self.classify_prompt(text, labels, examples, shots), " "
        if render_chat is None:
            raise TemplateError(f"template {self.name!r} asks in a chat turn", hint="pass render_chat=llm.render_chat")
        return render_chat(self.classify_messages(text, labels, examples, shots)), ""

    def _demos(self, labels: Sequence[str], examples: Sequence[tuple[str, str]] | None,
               shots: int | None) -> list[tuple[str, str]]:
        if examples is not None:
            return list(examples)
        return _round_robin(self.examples, labels, self.shots if shots is None else shots)

    def _instruction(self, labels: Sequence[str]) -> str:
        return _fill(self.name, self.instruction, {"labels": ", ".join(labels)}, strict=False)


@dataclass(frozen=True)
class Classification:
    """The best label, every label's score (its tokens' log-probabilities under `scoring`, minus
    the content-free input's where `calibrated`), and the convention that was applied."""

    label: str
    scores: dict[str, float] = field(default_factory=dict)
    scoring: str = "per_token"
    calibrated: bool = False


def _fields(text: str) -> list[str]:
    """Placeholder names; a format spec or conversion ({text:>999999999}, {text!r}) is refused:
    prompts only substitute text, and a width is a memory bomb in an untrusted bundle."""
    try:
        parsed = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(text) if name is not None]
    except ValueError as exc:  # a lone "{" or "}"
        raise TemplateError(f"{text[:40]!r}: {exc}", hint="write literal braces as {{ and }}") from None
    for name, spec, conversion in parsed:
        if spec or conversion:
            raise TemplateError(f"{text[:40]!r}: placeholder {{{name}}} carries a format spec or conversion",
                                hint="use plain {name} placeholders; write literal braces as {{ and }}")
    return [name for name, _, _ in parsed]


def _check_fields(name: str, part: str, text: str, allowed: set[str] | None, required: set[str] = frozenset()) -> None:
    try:
        names = _fields(text)
    except TemplateError as exc:
        raise TemplateError(f"template {name!r} {part}: {exc.message}", hint=exc.hint) from None
    for variable in names:
        if not variable.isidentifier():
            raise TemplateError(f"template {name!r} {part}: placeholder {{{variable}}} is not a plain name",
                                hint="use {name} placeholders only; write literal braces as {{ and }}")
        if allowed is not None and variable not in allowed:
            raise TemplateError(f"template {name!r} {part}: unknown placeholder {{{variable}}}",
                                hint=f"this part may use: {', '.join(sorted(allowed)) or 'no placeholders'}")
    missing = required - set(names)
    if missing:
        raise TemplateError(f"template {name!r} {part}: needs a {{{sorted(missing)[0]}}} placeholder",
                            hint="e.g. query: \"Review: {text}\\nSentiment:\"")


def _fill(name: str, text: str, values: dict[str, Any], strict: bool = True) -> str:
    """`text` with its placeholders filled; strict: a value the text does not use is an error too."""
    wanted = _fields(text)
    if not strict:
        values = {k: v for k, v in values.items() if k in wanted}
    missing = [v for v in wanted if v not in values]
    if missing:
        raise TemplateError(f"template {name!r}: variable {missing[0]!r} is missing",
                            hint=f"pass {', '.join(f'{v}=...' for v in dict.fromkeys(wanted))}")
    unknown = sorted(set(values) - set(wanted))
    if unknown:
        raise TemplateError(f"template {name!r}: unknown variable {unknown[0]!r}",
                            hint=f"it takes: {', '.join(dict.fromkeys(wanted)) or 'no variables'}")
    return text.format(**{k: str(v) for k, v in values.items()})


def _round_robin(pool: Sequence[tuple[str, str]], labels: Sequence[str], count: int) -> list[tuple[str, str]]:
    """`count` examples cycling through the labels in order, each label's examples in pool order."""
    by_label = {label: [e for e in pool if e[1] == label] for label in labels}
    chosen, taken = [], {label: 0 for label in labels}
    for i in range(count * len(labels)):
        if len(chosen) == count:
            break
        label = labels[i % len(labels)]
        if taken[label] < len(by_label[label]):
            chosen.append(by_label[label][taken[label]])
            taken[label] += 1
    return chosen


def template_from_dict(name: str, data: dict[str, Any]) -> PromptTemplate:
    known = set(PromptTemplate.__dataclass_fields__) - {"name"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise TemplateError(f"template {name!r}: unknown field {unknown[0]!r}", hint=f"known: {', '.join(sorted(known))}")
    values = dict(data)
    for key in ("labels", "stop"):
        if key in values:
            values[key] = tuple(values[key])
    if "examples" in values:
        values["examples"] = tuple((str(e["text"]), str(e["label"])) for e in values["examples"])
    return PromptTemplate(name=name, **values)


def template_to_dict(template: PromptTemplate) -> dict[str, Any]:
    data = {k: getattr(template, k) for k in PromptTemplate.__dataclass_fields__ if k != "name"}
    data["examples"] = [{"text": t, "label": label} for t, label in template.examples]
    data["labels"], data["stop"] = list(template.labels), list(template.stop)
    for key in ("scoring", "chat", "calibrate", "json_schema", "json_keys"):  # written only when set, so the file
        # still reads in older runtimes
        if data[key] == PromptTemplate.__dataclass_fields__[key].default:
            del data[key]
    return data


def read_prompts(path: Path) -> dict[str, PromptTemplate]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path}: not a readable prompt templates file ({exc})", hint="rebuild the bundle") from None
    if not isinstance(data, dict) or not isinstance(data.get("templates"), dict):
        raise BundleError(f"{path}: expected {{\"format\": 1, \"templates\": {{...}}}}", hint="rebuild the bundle")
    if data.get("format", 0) > PROMPTS_FORMAT:
        raise BundleError(f"{path}: format {data['format']} is newer than this runtime reads",
                          hint="pip install -U edgelm-runtime")
    try:
        return {name: template_from_dict(name, spec) for name, spec in data["templates"].items()}
    except (TypeError, KeyError, AttributeError) as exc:
        raise BundleError(f"{path}: {exc}", hint="rebuild the bundle") from None


def write_prompts(path: Path, templates: dict[str, PromptTemplate]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"format": PROMPTS_FORMAT, "templates": {n: template_to_dict(t) for n, t in templates.items()}}
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
