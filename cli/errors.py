"""The one way a ``prism`` command refuses to go on: :class:`CliError`, which ``main`` prints to
stderr as ``prism <command>: error: <flag>: <message>`` and turns into exit status 2."""

from __future__ import annotations


class CliError(Exception):
    """A flag, file or setting the command cannot use; ``flag`` names it (None when the message does)."""

    def __init__(self, flag: str | None, message: str) -> None:
        super().__init__(f"{flag}: {message}" if flag else message)
        self.flag = flag
        self.message = message
