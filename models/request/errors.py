"""Errors the engine raises for bad input, so callers can map them to user-facing messages."""

from typing import Literal


class InvalidInput(ValueError):
    """A prompt, word list or parameter is unusable; ``field`` names the offending argument."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class NothingToEdit(InvalidInput):
    """The edit would not change the caption of these findings (no devices to remove, say): in a
    batch such a row is skipped with this reason rather than failed."""


class ImageError(ValueError):
    """The input image cannot be used; ``kind`` says why: ``invalid`` (undecodable, or a shape the
    engine does not take), ``unsupported`` (a format or encoding it does not read) or ``too_large``."""

    def __init__(self, message: str, kind: Literal["invalid", "unsupported", "too_large"] = "invalid") -> None:
        super().__init__(message)
        self.message = message
        self.kind = kind


class ModelLoadError(RuntimeError):
    """A model directory or weights file is missing or malformed; the message names the path."""
