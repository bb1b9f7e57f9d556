"""Read a YAML file into a pydantic model, turning every failure into one line naming file and field."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from edgelm.errors import ConfigError

Model = TypeVar("Model", bound=BaseModel)


# where each kind of file's fields are documented
_DOCS = {"profile": "docs/device-profiles.md", "recipe": "docs/recipes-and-adapters.md", "matrix": "docs/matrix.md"}


def load_yaml_model(path: Path, kind: type[Model], what: str) -> Model:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what} ({exc.strerror})", hint=f"check the {what} path") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: {what} is not UTF-8 text", hint="save it as UTF-8 YAML") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}:{where} YAML syntax error: {problem}", hint="fix the YAML syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of fields at the top level", hint=f"see {_DOCS.get(what, 'README.md')} for the {what} format")
    return validate(data, kind, str(path), what)


def validate(data: dict, kind: type[Model], source: str, what: str) -> Model:
    try:
        return kind.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {describe_validation_error(exc)}", hint=f"see {_DOCS.get(what, 'README.md')} for the {what} fields") from None


def describe_validation_error(exc: ValidationError) -> str:
    """First error as `field.path: message (got value)` — the shape users can act on."""
    err = exc.errors()[0]
    field = ".".join(str(part) for part in err["loc"] if not str(part).startswith("function-"))
    got = err.get("input")
    shown = "" if err["type"] in ("missing", "extra_forbidden") or isinstance(got, dict) else f" (got {got!r})"
    message = "unknown field" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
    if not field:  # a check across fields names them in its message ("export.opset: ...")
        return message
    return f"{field}: {message}{shown}"
