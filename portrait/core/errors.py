"""The error hierarchy. The CLI maps each class to its exit code; nothing else does.

A user error is one line that names the file (or model, or identity) and the reason,
so every subclass takes a ready message and never a traceback.

Exit codes (the CLI contract, listed in the README):
    0 success; 1 a bug in portrait; 2 bad input or usage; 3 a required model is missing;
    4 the environment failed an output (disk full, read-only or unwritable folder, I/O error);
    130 stopped by SIGINT (Ctrl-C); 143 stopped by SIGTERM.
"""

from __future__ import annotations

import errno
import os
import signal


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


class OutputFailed(PortraitError):
    """The machine refused an output: no space, read-only, permission, I/O error (exit 4).

    Not the user's input (2) and not a bug (1): the same command works once the disk or the
    folder is fixed. The message is `<path>: <reason>`."""

    exit_code = 4


class Interrupted(KeyboardInterrupt):
    """SIGINT (exit 130) or SIGTERM (exit 143) stopped a command; the message says what was kept.

    A KeyboardInterrupt, not a PortraitError: code that catches Exception (a batch item's error
    handling, a retry loop) must not swallow a stop request."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.message = message
        self.signum = int(signum)
        self.exit_code = 128 + self.signum

    def __str__(self) -> str:
        return self.message


# errno values that mean "the environment refused the write", not "portrait has a bug".
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO,
                                errno.EFBIG, errno.EMFILE, errno.ENFILE})


def output_failed(path: object, exc: OSError) -> OutputFailed:
    """`<path>: <reason>` for an OSError raised while writing `path` (the reason in lower case,
    `no space left on device`)."""
    reason = (exc.strerror or os.strerror(exc.errno or 0) or str(exc)).lower()
    return OutputFailed(f"{path}: {reason}")


def bad_file(path: object, reason: str) -> BadInput:
    """The one-line form every file error takes: `<path>: <reason>`."""
    return BadInput(f"{path}: {reason}")
