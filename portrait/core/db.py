"""SQLite connections for the project's small databases (the studio store, the service's tenants).

One helper so both open a database the same way: autocommit mode (`isolation_level=None`;
callers write `BEGIN IMMEDIATE` ... `COMMIT` themselves, so two runners never both read-then-write),
a 60 s busy timeout (concurrent batch runners wait for the write lock instead of failing),
rows as `sqlite3.Row`, and the connection closed on the way out even when the block raises.
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from typing import Iterator

_SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")


@contextlib.contextmanager
def connect(path: Path | str, *, synchronous: str | None = None) -> Iterator[sqlite3.Connection]:
    """An open connection to `path`; `synchronous` sets `PRAGMA synchronous` (FULL: a commit that
    returned survives a power cut, not only a crash)."""
    if synchronous is not None and synchronous not in _SYNCHRONOUS:
        raise ValueError(f"synchronous={synchronous!r} is not one of {', '.join(_SYNCHRONOUS)}")
    con = sqlite3.connect(path, timeout=60.0, isolation_level=None)
    try:
        con.row_factory = sqlite3.Row
        con.execute("PRAGMA busy_timeout=60000")
        if synchronous is not None:
            con.execute(f"PRAGMA synchronous={synchronous}")
        yield con
    finally:
        con.close()


@contextlib.contextmanager
def opening(path: Path | str) -> Iterator[None]:
    """Hold while a database's schema is set up (WAL switch, CREATE IF NOT EXISTS, added columns).

    Several processes opening one new database at once failed with "database is locked" even
    under the busy timeout (2 of 6 runs of test_studio's six-process test): SQLite answers BUSY
    at once, without waiting, to a reader that asks to write while another connection holds the
    write lock (its deadlock rule), and the WAL switch and the schema script do exactly that.
    An flock on a lock file beside the database puts the openers in line; it is not SQLite's own
    lock file and the holder removes it (portrait.core.lock), so nothing is left behind.
    """
    from .lock import held

    path = Path(path)
    with held(path.with_name(f".{path.name}.opening"), f"database {path}", wait=True):
        yield
