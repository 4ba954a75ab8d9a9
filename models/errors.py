"""Errors the engine raises for bad input, so callers can map them to user-facing messages."""


class InvalidInput(ValueError):
    """A prompt, word list or parameter is unusable; ``field`` names the offending argument."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class ImageError(ValueError):
    """The input image cannot be decoded or is outside what the engine accepts."""


class ModelLoadError(RuntimeError):
    """A model directory or weights file is missing or malformed; the message names the path."""
