"""Errors the runtime raises: each says what went wrong and how to fix it, in one line each.

The CLI prints `error: <message>` and `hint: <hint>`; apps can catch `EdgelmRuntimeError`."""

from __future__ import annotations


class EdgelmRuntimeError(Exception):
    """Base class: a message for the user and an optional hint naming the fix."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} (hint: {self.hint})"


class BundleError(EdgelmRuntimeError):
    """The bundle folder or its manifest is missing, corrupt, too new or unsafe."""


class GenerationError(EdgelmRuntimeError):
    """A request cannot be served: prompt too long, invalid sampling parameters."""


class TemplateError(EdgelmRuntimeError):
    """A chat or prompt template failed to render (or tried to leave the sandbox)."""


class InputError(GenerationError):
    """The texts given to an encoder cannot be used: an empty list, a non-string item, batch_size < 1."""
