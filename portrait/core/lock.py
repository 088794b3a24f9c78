"""One writer per identity: an advisory lock file holding the holder's pid.

Training, resuming, overwriting or deleting HOME/identities/NAME takes
HOME/identities/.NAME.lock with `flock`. The kernel drops the lock when its process dies
(kill -9 included), so a stale file never blocks anyone; the pid inside is only there to
name the holder in the refusal.

The holder removes the file as it lets go, so nothing is left in identities/ once no one holds
the name (a refused taker never held it and leaves nothing either). Removing a lock file races
with the next taker, who may have opened the old file just before it was unlinked and then
lock an inode no path names; so a taker, once it holds the lock, checks that the path still
names the file it locked, and starts over when it does not (the usual unlink-on-release rule).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator

from .errors import BadInput
from .io import make_dirs


@contextlib.contextmanager
def held(path: Path, what: str, wait: bool = False) -> Iterator[Path]:
    """Hold the lock at `path` for the block. Busy: BadInput naming the holder's pid (exit 2),
    or, with `wait`, block until it is free."""
    path = Path(path)
    make_dirs(path.parent)
    fd = _take(path, what, wait)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield path
        finally:
            try:
                path.unlink()  # while still held: the next taker re-checks the path (see the module doc)
            except OSError:
                pass
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _take(path: Path, what: str, wait: bool) -> int:
    """An open descriptor of the lock file at `path`, locked; refused (BadInput) when busy."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise BadInput(f"{what} is in use by process {holder or '?'} (lock {path}); "
                           f"wait for it to finish, or pass --wait") from None
        except BaseException:
            os.close(fd)
            raise
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        mine = os.fstat(fd)
        if current is not None and (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
            return fd
        os.close(fd)  # the holder before us removed this file as we waited: take the new one


def _holder(fd: int) -> str:
    try:
        return os.pread(fd, 32, 0).decode().strip()
    except OSError:
        return ""


def identity_lock(identities_dir: Path, name: str, wait: bool = False):
    """The lock of one identity name (its bundle, its work and staging folders)."""
    return held(Path(identities_dir) / f".{name}.lock", f"identity '{name}'", wait=wait)
