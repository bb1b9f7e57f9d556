"""Prompt templates as authored (YAML in a recipe, a --templates file, or edgelm's defaults).

Validated here with the field named (`templates.sentiment.query: ...`), then checked by the
runtime's own PromptTemplate (placeholders, labels) so what builds is what the runtime accepts.
The bundle stores them as JSON (edgelm_runtime.prompts); the runtime reads no YAML."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, model_validator

from edgelm.config._yaml import load_yaml_model
from edgelm.config.profile import Frozen
from edgelm_runtime.errors import TemplateError
from edgelm_runtime.prompts import PromptTemplate, template_from_dict
from edgelm_runtime.scoring import SCORINGS


class Example(Frozen):
    text: str
    label: str


class TemplateSpec(Frozen):
    kind: Literal["classify", "generate"]
    description: str = ""
    # classify: instruction (may use {labels}), query with {text}; a label follows the query after a space
    instruction: str = ""
    query: str = ""
    labels: tuple[str, ...] = ()
    examples: tuple[Example, ...] = ()
    shots: int = Field(0, ge=0, le=32, description="pool examples used by default (round-robin over labels)")
    separator: str = "\n\n"
    scoring: Literal[SCORINGS] | None = Field(  # type: ignore[valid-type]
        None, description="the scoring convention classify() uses with this template (default: by the labels' tokens)")
    chat: bool = Field(False, description="ask in a user turn of the chat template; the label is the reply")
    calibrate: bool | None = Field(
        None, description="classify() calibrates against a content-free input by default (default: by the labels' tokens)")
    # generate: free text with {variables}
    template: str = ""
    stop: tuple[str, ...] = ()
    max_new_tokens: int | None = Field(None, ge=1, le=4096)
    json_schema: dict[str, Any] | None = Field(None, description="generate: the output follows this JSON schema")
    json_keys: str = Field("", description="generate: the output is a JSON object keyed by this variable's names")

    @model_validator(mode="after")
    def _runtime_accepts(self) -> "TemplateSpec":
        if self.kind == "classify" and (len(self.labels) == 1 or len(set(self.labels)) != len(self.labels)):
            raise ValueError("labels: need two or more distinct labels (or none: the caller passes them)")
        try:
            self.to_runtime("template")
        except TemplateError as exc:
            raise ValueError(exc.message.replace("template 'template' ", "")) from None
        return self

    def to_runtime(self, name: str) -> PromptTemplate:
        return template_from_dict(name, self.model_dump(mode="json"))


class TemplatesFile(Frozen):
    templates: dict[str, TemplateSpec]


def default_templates() -> dict[str, TemplateSpec]:
    text = (resources.files("edgelm.data") / "prompts.yaml").read_text(encoding="utf-8")
    return TemplatesFile.model_validate(yaml.safe_load(text)).templates


def load_templates(path: str | Path) -> dict[str, TemplateSpec]:
    from edgelm.errors import ConfigError

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: templates file not found", hint="check the --templates path")
    return load_yaml_model(path, TemplatesFile, "templates").templates
