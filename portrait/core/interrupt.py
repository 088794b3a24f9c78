"""SIGTERM as an interruption, so `kill PID` and Ctrl-C stop a command the same careful way.

Python turns SIGINT into KeyboardInterrupt; SIGTERM, by default, kills the process with no
`finally` run, leaving staging folders and held locks behind. `sigterm_raises()` makes SIGTERM
raise `Terminated` (a KeyboardInterrupt), so every handler written for Ctrl-C also cleans up
after `kill`, and `signal_of(exc)` tells the two apart for the exit code (130 vs 143).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived (raised by the handler `sigterm_raises` installs)."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises Terminated in the main thread (no-op elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def signal_of(exc: BaseException) -> int:
    """The signal behind an interruption: SIGTERM for Terminated, else SIGINT."""
    if hasattr(exc, "signum"):
        return int(exc.signum)
    return int(signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)
