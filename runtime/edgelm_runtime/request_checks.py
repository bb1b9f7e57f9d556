"""Checks and error bodies shared by every endpoint of `edgelm serve`: one-line OpenAI-style
errors that name their field, strict JSON, valid Unicode, and no path of the server's machine."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any


class RequestError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": " ".join(self.message.split()) or "error", "type": self.kind,
                          "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None) -> RequestError:
    return RequestError(400, message, param)


def parse_body(raw: bytes) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise bad("the request body is not valid UTF-8") from None
    try:
        body = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise bad("the request body is nested too deeply") from None
    except ValueError:  # also NaN / Infinity, and integers over Python's digit limit
        raise bad("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    return body


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def check_text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise bad(f"{name} must be a string", name)
    check_unicode(value, name)
    return value


def is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def valid_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_unicode(text: str, name: str) -> None:
    """JSON may carry lone surrogates ("\\ud800"), which no tokenizer (or UTF-8) can take."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise bad(f"{name} is not valid Unicode (a lone surrogate at character {exc.start})", name) from None


def show(value: Any) -> str:
    text = ascii(value)
    return text if len(text) <= 40 else text[:37] + "..."


def param(name: str) -> str:
    return ascii(name)[1:-1][:64]


# a path of this machine, not one of the server's own endpoints (/v1/embeddings)
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/])(?:[A-Za-z]:\\|/(?!v1/))(?:[^\s/\\'\"():,]+[/\\])*[^\s/\\'\"():,]+")


def public(message: str, *folders: Path) -> str:
    """A message fit for a client: the bundle folders' own paths made relative, any other path cut."""
    for folder in folders:
        for prefix in sorted({str(folder.resolve()), os.path.abspath(folder), str(folder)}, key=len, reverse=True):
            message = message.replace(prefix + os.sep, "").replace(prefix, folder.name)
    return _ABSOLUTE_PATH.sub("<path>", message)
