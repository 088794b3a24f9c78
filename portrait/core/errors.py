"""The error hierarchy. The CLI maps each class to its exit code; nothing else does.

A user error is one line that names the file (or model, or identity) and the reason,
so every subclass takes a ready message and never a traceback.
"""

from __future__ import annotations


class PortraitError(Exception):
    """Something went wrong inside portrait itself (exit 1)."""

    exit_code = 1


class BadInput(PortraitError):
    """The user gave something we cannot use: a file, a name, an option (exit 2)."""

    exit_code = 2


class ModelMissing(PortraitError):
    """A required model is not on disk; the message names the command that fetches it (exit 3)."""

    exit_code = 3

    def __init__(self, model_id: str, command: str | None = None, detail: str = ""):
        self.model_id = model_id
        self.command = command or f"portrait models download {model_id}"
        extra = f" ({detail})" if detail else ""
        super().__init__(f"model '{model_id}' is not present{extra}; run `{self.command}`")


def bad_file(path: object, reason: str) -> BadInput:
    """The one-line form every file error takes: `<path>: <reason>`."""
    return BadInput(f"{path}: {reason}")
