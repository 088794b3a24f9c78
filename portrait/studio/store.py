"""The durable item store: SQLite in WAL mode, one row per item.

States: pending -> running -> done | failed (and running -> pending again when a worker
dies, or when a transient error is retried after a backoff).

Guarantees, each one a single transaction (`BEGIN IMMEDIATE` takes SQLite's write lock,
so two workers, in any processes, never claim the same item):

- `claim` first re-queues the items of dead workers (same host and the process is gone:
  at once; any host: when the lease has expired), fails items whose dependency failed,
  then hands out one pending item: round robin over the items' owners (the owner served
  longest ago goes first, one below its running limit; docs/ARCHITECTURE.md#fair-queue),
  and within an owner preferring the worker's current group so its pipelines stay warm.
  `portrait batch` submits without an owner, so there is one owner and nothing changes.
- `complete` marks an item done only if this worker still holds it; the caller renames
  the outputs into place before calling it, so `done` always means the files exist.
- `fail` retries transient errors with exponential backoff up to `max_attempts` and fails
  permanent ones at once, keeping the reason.
- `cancel` fails pending items at once and flags running ones; the worker running a flagged
  item learns it from its next progress write (`set_progress` answers it) and stops there.

A worker killed mid-item may have renamed some outputs already; outputs have names fixed
by the item, so the re-run overwrites them and nothing is written twice.

WAL needs the database on a local disk (not NFS): workers of one host share it; across
hosts, the Ray runner's driver is the only process that opens the store.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from portrait.core.db import connect, opening
from portrait.core.errors import BadInput

from .spec import Item, Job

STATES = ("pending", "running", "done", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    source TEXT NOT NULL,
    spec TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS items (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    grp TEXT NOT NULL,
    ord INTEGER NOT NULL,
    priority INTEGER NOT NULL,
    label TEXT NOT NULL,
    payload TEXT NOT NULL,
    depends_on TEXT,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL,
    error TEXT,
    error_kind TEXT,
    outputs TEXT NOT NULL DEFAULT '[]',
    meta TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    seconds REAL,
    worker TEXT,
    host TEXT,
    pid INTEGER,
    pid_start TEXT,
    lease_until REAL,
    not_before REAL NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS job_items (
    job TEXT NOT NULL,
    item TEXT NOT NULL,
    PRIMARY KEY (job, item)
);
CREATE INDEX IF NOT EXISTS items_state ON items (state, priority, grp, ord);
CREATE TABLE IF NOT EXISTS owners (
    owner TEXT PRIMARY KEY,
    served INTEGER NOT NULL DEFAULT 0,
    max_running INTEGER
);
CREATE TABLE IF NOT EXISTS item_progress (
    item TEXT PRIMARY KEY,
    data TEXT NOT NULL,
    updated REAL NOT NULL
);
"""


# Columns added after the first release (an older store gains them when opened).
_COLUMNS = {"owner": "TEXT NOT NULL DEFAULT ''", "cancel": "INTEGER NOT NULL DEFAULT 0"}


def process_start_token(pid: int) -> str:
    """The kernel's start time of a process, so a reused pid is not mistaken for a live worker."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    # The command name (field 2) may hold spaces; fields after the last ')' are fixed.
    return stat.rsplit(")", 1)[1].split()[19]


def process_alive(pid: int, start_token: str = "") -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs (macOS): trust kill(0)
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":  # killed but not yet reaped: it will never finish its item
        return False
    return not start_token or fields[19] == start_token


@dataclass(frozen=True)
class WorkerId:
    """Who holds a lease: a unique id, and the host and process to check for liveness."""

    id: str
    host: str
    pid: int
    pid_start: str

    @classmethod
    def current(cls, tag: str = "") -> "WorkerId":
        pid = os.getpid()
        host = socket.gethostname()
        suffix = f":{tag}" if tag else ""
        return cls(f"{host}:{pid}:{uuid.uuid4().hex[:6]}{suffix}", host, pid, process_start_token(pid))


@dataclass(frozen=True)
class RetryPolicy:
    lease_seconds: float = 120.0
    max_attempts: int = 3
    backoff_seconds: float = 5.0
    backoff_max_seconds: float = 300.0

    def backoff(self, attempts: int) -> float:
        return min(self.backoff_seconds * 2 ** max(attempts - 1, 0), self.backoff_max_seconds)


@dataclass(frozen=True)
class ItemRow:
    """One item as the store sees it (what `status` reports)."""

    item: Item
    state: str
    attempts: int
    max_attempts: int
    error: str | None
    error_kind: str | None
    outputs: tuple[str, ...]
    meta: dict[str, Any]
    created: float
    started: float | None
    finished: float | None
    seconds: float | None
    worker: str | None
    lease_until: float | None
    not_before: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.item.id, "kind": self.item.kind, "label": self.item.label, "group": self.item.group,
            "state": self.state, "attempts": self.attempts, "max_attempts": self.max_attempts,
            "error": self.error, "error_kind": self.error_kind, "outputs": list(self.outputs), "meta": self.meta,
            "created": self.created, "started": self.started, "finished": self.finished, "seconds": self.seconds,
            "worker": self.worker, "lease_until": self.lease_until, "depends_on": self.item.depends_on,
        }


@dataclass(frozen=True)
class Submission:
    job: str
    added: int  # items new to the store
    total: int  # items of this job


@dataclass(frozen=True)
class StoreStatus:
    jobs: tuple[str, ...]
    items: tuple[ItemRow, ...]
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return len(self.items)

    @property
    def finished(self) -> bool:
        return self.counts.get("pending", 0) == 0 and self.counts.get("running", 0) == 0

    def failed(self) -> list[ItemRow]:
        return [r for r in self.items if r.state == "failed"]

    def as_dict(self) -> dict[str, Any]:
        return {"jobs": list(self.jobs), "counts": dict(self.counts), "total": self.total,
                "items": [r.as_dict() for r in self.items]}


class Store:
    """The SQLite store. Every method opens its own short connection, so a Store can be
    shared by threads and its path handed to other processes."""

    def __init__(self, path: Path | str, retry: RetryPolicy | None = None):
        self.path = Path(path).expanduser()
        self.retry = retry or RetryPolicy()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with opening(self.path), self._connect() as con:
                con.execute("PRAGMA journal_mode=WAL")
                con.executescript(_SCHEMA)
                # Look and add under one write lock: two processes opening a new store at once
                # both saw the column missing and the second ALTER failed ("duplicate column
                # name: cancel", seen once in test_studio's Ctrl-C test).
                con.execute("BEGIN IMMEDIATE")
                try:
                    have = {r["name"] for r in con.execute("PRAGMA table_info(items)")}
                    for column, decl in _COLUMNS.items():
                        if column not in have:
                            con.execute(f"ALTER TABLE items ADD COLUMN {column} {decl}")
                    con.execute("CREATE INDEX IF NOT EXISTS items_owner ON items (owner, state)")
                except BaseException:
                    con.execute("ROLLBACK")
                    raise
                con.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            raise BadInput(f"{self.path}: not a studio store ({exc})") from None
        except OSError as exc:
            raise BadInput(f"{self.path}: cannot open the store ({exc.strerror or exc})") from None

    # -- plumbing ---------------------------------------------------------------------

    def _connect(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        # FULL: a `done` that was reported survives a power cut, not only a crash.
        return connect(self.path, synchronous="FULL")

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._connect() as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    # -- submitting -------------------------------------------------------------------

    def submit(self, job: Job, owner: str = "") -> Submission:
        """Add a job's items (those new to the store). `owner`: who the items are fair to (the
        service's tenant); claims go round robin over owners."""
        now = time.time()
        added = 0
        with self._transaction() as con:
            con.execute("INSERT OR IGNORE INTO jobs (id, source, spec, created) VALUES (?, ?, ?, ?)",
                        (job.id, job.source, json.dumps(job.spec), now))
            for item in job.items:
                cur = con.execute(
                    "INSERT OR IGNORE INTO items (id, kind, grp, ord, priority, label, payload, depends_on,"
                    " max_attempts, created, owner) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (item.id, item.kind, item.group, item.order, item.priority, item.label,
                     json.dumps(item.payload), item.depends_on, self.retry.max_attempts, now, owner),
                )
                added += cur.rowcount
                con.execute("INSERT OR IGNORE INTO job_items (job, item) VALUES (?, ?)", (job.id, item.id))
        return Submission(job=job.id, added=added, total=len(job.items))

    # -- claiming ---------------------------------------------------------------------

    def claim(self, worker: WorkerId, jobs: Iterable[str] | None = None, prefer_group: str | None = None,
              lease_seconds: float | None = None) -> Item | None:
        """Hand one runnable item to `worker`, or None. One transaction."""
        now = time.time()
        lease = lease_seconds if lease_seconds is not None else self.retry.lease_seconds
        job_ids = list(jobs) if jobs is not None else None
        with self._transaction() as con:
            self._requeue_orphans(con, now)
            self._fail_dependents(con, now)
            where, args = self._job_filter(job_ids, "i")
            runnable = ("FROM items i LEFT JOIN items d ON d.id = i.depends_on WHERE i.state = 'pending'"
                        " AND i.not_before <= ? AND (i.depends_on IS NULL OR d.state = 'done')" + where)
            owners = [r["owner"] for r in con.execute("SELECT DISTINCT i.owner " + runnable, (now, *args))]
            if not owners:
                return None
            # Round robin: the owner served longest ago first (a new one before all), skipping
            # one that already runs its limit; within the owner, the usual order.
            served = {r["owner"]: (r["served"], r["max_running"]) for r in con.execute("SELECT * FROM owners")}
            running = {r["owner"]: r["n"] for r in con.execute(
                "SELECT owner, COUNT(*) AS n FROM items WHERE state = 'running' GROUP BY owner")}
            row = None
            for owner in sorted(owners, key=lambda o: (served.get(o, (0, None))[0], o)):
                limit = served.get(owner, (0, None))[1]
                if limit is not None and running.get(owner, 0) >= limit:
                    continue
                row = con.execute("SELECT i.* " + runnable + " AND i.owner = ?"
                                  " ORDER BY i.priority, (i.grp = ?) DESC, i.grp, i.ord LIMIT 1",
                                  (now, *args, owner, prefer_group or "")).fetchone()
                if row is not None:
                    break
            if row is None:
                return None
            con.execute("INSERT INTO owners (owner, served) VALUES (?, (SELECT COALESCE(MAX(served), 0) + 1 FROM owners))"
                        " ON CONFLICT(owner) DO UPDATE SET served = (SELECT COALESCE(MAX(served), 0) + 1 FROM owners)",
                        (row["owner"],))
            cur = con.execute(
                "UPDATE items SET state = 'running', attempts = attempts + 1, worker = ?, host = ?, pid = ?,"
                " pid_start = ?, started = ?, finished = NULL, seconds = NULL, lease_until = ?"
                " WHERE id = ? AND state = 'pending'",
                (worker.id, worker.host, worker.pid, worker.pid_start, now, now + lease, row["id"]),
            )
            if cur.rowcount != 1:  # cannot happen under the write lock; never hand out twice
                return None
            return _item(row)

    def _job_filter(self, job_ids: list[str] | None, alias: str) -> tuple[str, list[str]]:
        if job_ids is None:
            return "", []
        marks = ",".join("?" * len(job_ids)) or "NULL"
        return f" AND {alias}.id IN (SELECT item FROM job_items WHERE job IN ({marks}))", list(job_ids)

    def _requeue_orphans(self, con: sqlite3.Connection, now: float) -> None:
        here = socket.gethostname()
        for row in con.execute("SELECT id, worker, host, pid, pid_start, lease_until, attempts, max_attempts"
                               " FROM items WHERE state = 'running'").fetchall():
            expired = row["lease_until"] is not None and row["lease_until"] < now
            gone = row["host"] == here and row["pid"] is not None and not process_alive(row["pid"], row["pid_start"] or "")
            if not (expired or gone):
                continue
            why = "its process is gone" if gone else "its lease expired"
            if row["attempts"] >= row["max_attempts"]:
                con.execute(
                    "UPDATE items SET state = 'failed', error = ?, error_kind = 'crashed', finished = ?,"
                    " lease_until = NULL WHERE id = ?",
                    (f"worker {row['worker']} stopped while running it ({why}) after {row['attempts']} attempts",
                     now, row["id"]))
            else:
                con.execute(
                    "UPDATE items SET state = 'pending', error = ?, error_kind = 'crashed', lease_until = NULL,"
                    " not_before = ? WHERE id = ?",
                    (f"worker {row['worker']} stopped while running it ({why}); re-queued", now, row["id"]))

    def _fail_dependents(self, con: sqlite3.Connection, now: float) -> None:
        rows = con.execute(
            "SELECT i.id, d.label, d.error FROM items i JOIN items d ON d.id = i.depends_on"
            " WHERE i.state = 'pending' AND d.state = 'failed'").fetchall()
        for row in rows:
            con.execute(
                "UPDATE items SET state = 'failed', error = ?, error_kind = 'dependency', finished = ? WHERE id = ?",
                (f"needs '{row['label']}', which failed: {row['error']}", now, row["id"]))

    # -- settling ---------------------------------------------------------------------

    def heartbeat(self, worker: WorkerId, lease_seconds: float | None = None) -> int:
        """Extend the lease of every item `worker` is running; returns how many."""
        lease = lease_seconds if lease_seconds is not None else self.retry.lease_seconds
        with self._transaction() as con:
            return con.execute("UPDATE items SET lease_until = ? WHERE state = 'running' AND worker = ?",
                               (time.time() + lease, worker.id)).rowcount

    def complete(self, item_id: str, worker: WorkerId, outputs: Iterable[str], meta: dict[str, Any] | None = None) -> bool:
        """Mark done (outputs already in place). False if the worker no longer holds the item."""
        now = time.time()
        with self._transaction() as con:
            return con.execute(
                "UPDATE items SET state = 'done', outputs = ?, meta = ?, finished = ?, seconds = ? - started,"
                " error = NULL, error_kind = NULL, lease_until = NULL WHERE id = ? AND state = 'running' AND worker = ?",
                (json.dumps([str(o) for o in outputs]), json.dumps(meta or {}, default=str), now, now, item_id,
                 worker.id),
            ).rowcount == 1

    def fail(self, item_id: str, worker: WorkerId, error: str, kind: str, permanent: bool) -> str | None:
        """Record an error. Returns the new state ('pending' for a retry, 'failed'), or None if not held."""
        now = time.time()
        with self._transaction() as con:
            row = con.execute("SELECT attempts, max_attempts FROM items WHERE id = ? AND state = 'running'"
                              " AND worker = ?", (item_id, worker.id)).fetchone()
            if row is None:
                return None
            if permanent or row["attempts"] >= row["max_attempts"]:
                con.execute("UPDATE items SET state = 'failed', error = ?, error_kind = ?, finished = ?,"
                            " seconds = ? - started, lease_until = NULL WHERE id = ?",
                            (error, kind, now, now, item_id))
                return "failed"
            con.execute("UPDATE items SET state = 'pending', error = ?, error_kind = ?, lease_until = NULL,"
                        " not_before = ? WHERE id = ?",
                        (error, kind, now + self.retry.backoff(row["attempts"]), item_id))
            return "pending"

    def release(self, item_id: str, worker: WorkerId) -> bool:
        """Give an item back untouched (the worker was stopped); the attempt does not count."""
        with self._transaction() as con:
            return con.execute(
                "UPDATE items SET state = 'pending', attempts = MAX(attempts - 1, 0), lease_until = NULL,"
                " not_before = 0 WHERE id = ? AND state = 'running' AND worker = ?", (item_id, worker.id)).rowcount == 1

    def retry_failed(self, jobs: Iterable[str] | None = None) -> int:
        """Queue failed (and cancelled) items again, attempts counted from zero."""
        where, args = self._job_filter(list(jobs) if jobs is not None else None, "items")
        with self._transaction() as con:
            return con.execute(
                "UPDATE items SET state = 'pending', attempts = 0, error = NULL, error_kind = NULL, not_before = 0,"
                " finished = NULL, seconds = NULL, cancel = 0 WHERE state = 'failed'" + where, args).rowcount

    def cancel(self, jobs: Iterable[str], reason: str = "cancelled", running: bool = False) -> int:
        """Fail every pending item of `jobs` at once; with `running`, flag their running items
        too (each stops at its next progress write). Returns the items cancelled or flagged."""
        where, args = self._job_filter(list(jobs), "items")
        with self._transaction() as con:
            count = con.execute(
                "UPDATE items SET state = 'failed', error = ?, error_kind = 'cancelled', finished = ?"
                " WHERE state = 'pending'" + where, (reason, time.time(), *args)).rowcount
            if running:
                count += con.execute("UPDATE items SET cancel = 1 WHERE state = 'running'" + where, args).rowcount
            return count

    def cancel_requested(self, item_id: str) -> bool:
        with self._connect() as con:
            row = con.execute("SELECT cancel FROM items WHERE id = ?", (item_id,)).fetchone()
        return bool(row and row["cancel"])

    def settle_cancelled(self, item_id: str, worker: WorkerId, reason: str = "cancelled") -> bool:
        """The worker stopped a flagged item: failed as cancelled (retry queues it again)."""
        now = time.time()
        with self._transaction() as con:
            return con.execute(
                "UPDATE items SET state = 'failed', error = ?, error_kind = 'cancelled', finished = ?,"
                " seconds = ? - started, lease_until = NULL, cancel = 0 WHERE id = ? AND state = 'running'"
                " AND worker = ?", (reason, now, now, item_id, worker.id)).rowcount == 1

    # -- owners -----------------------------------------------------------------------------

    def set_owner_limit(self, owner: str, max_running: int | None) -> None:
        """At most `max_running` items of `owner` run at once (None: no limit)."""
        with self._transaction() as con:
            con.execute("INSERT INTO owners (owner, served, max_running) VALUES (?, 0, ?)"
                        " ON CONFLICT(owner) DO UPDATE SET max_running = excluded.max_running", (owner, max_running))

    def active_jobs(self, owner: str) -> int:
        """The owner's jobs with an item queued or running."""
        with self._connect() as con:
            return con.execute("SELECT COUNT(DISTINCT j.job) FROM job_items j JOIN items i ON i.id = j.item"
                               " WHERE i.owner = ? AND i.state IN ('pending', 'running')", (owner,)).fetchone()[0]

    def owner_counts(self, owner: str) -> dict[str, int]:
        """The owner's items per state (pending and running are its queue)."""
        with self._connect() as con:
            rows = con.execute("SELECT state, COUNT(*) AS n FROM items WHERE owner = ? GROUP BY state", (owner,)).fetchall()
        counts = {state: 0 for state in STATES}
        counts.update({r["state"]: r["n"] for r in rows})
        return counts

    def forget(self, jobs: Iterable[str]) -> int:
        """Remove jobs and their items (those no other job shares) from the store, so nothing
        of them remains (the service erases a customer's identity). Running items are kept:
        the caller cancels and waits first. Returns the items removed."""
        job_ids = list(jobs)
        if not job_ids:
            return 0
        marks = ",".join("?" * len(job_ids))
        with self._transaction() as con:
            rows = con.execute(
                f"SELECT i.id FROM items i JOIN job_items j ON j.item = i.id WHERE j.job IN ({marks})"
                f" AND i.state != 'running' AND NOT EXISTS (SELECT 1 FROM job_items o WHERE o.item = i.id"
                f" AND o.job NOT IN ({marks}))", (*job_ids, *job_ids)).fetchall()
            items = [r["id"] for r in rows]
            for item in items:
                con.execute("DELETE FROM items WHERE id = ?", (item,))
                con.execute("DELETE FROM item_progress WHERE item = ?", (item,))
            con.execute(f"DELETE FROM job_items WHERE job IN ({marks})", job_ids)
            con.execute(f"DELETE FROM jobs WHERE id IN ({marks})", job_ids)
        return len(items)

    # -- progress within an item ----------------------------------------------------------

    def set_progress(self, item_id: str, data: dict[str, Any]) -> bool:
        """Where a running item is (phase, step, total): one upsert, written by the worker.
        Returns True when the item was cancelled meanwhile (the worker stops it)."""
        with self._connect() as con:
            con.execute("INSERT INTO item_progress (item, data, updated) VALUES (?, ?, ?)"
                        " ON CONFLICT(item) DO UPDATE SET data = excluded.data, updated = excluded.updated",
                        (item_id, json.dumps(data, default=str), time.time()))
            row = con.execute("SELECT cancel FROM items WHERE id = ?", (item_id,)).fetchone()
        return bool(row and row["cancel"])

    def progress(self, item_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        ids = list(item_ids)
        if not ids:
            return {}
        with self._connect() as con:
            rows = con.execute(f"SELECT item, data, updated FROM item_progress WHERE item IN ({','.join('?' * len(ids))})",
                               ids).fetchall()
        return {r["item"]: {**json.loads(r["data"]), "updated": r["updated"]} for r in rows}

    # -- reading ----------------------------------------------------------------------

    def job_ids(self) -> list[str]:
        with self._connect() as con:
            return [r["id"] for r in con.execute("SELECT id FROM jobs ORDER BY created")]

    def status(self, jobs: Iterable[str] | None = None) -> StoreStatus:
        job_ids = list(jobs) if jobs is not None else None
        where, args = self._job_filter(job_ids, "items")
        with self._connect() as con:
            rows = con.execute("SELECT * FROM items WHERE 1 = 1" + where + " ORDER BY priority, grp, ord",
                               args).fetchall()
        items = tuple(_row(r) for r in rows)
        counts = {state: 0 for state in STATES}
        for r in items:
            counts[r.state] += 1
        return StoreStatus(jobs=tuple(job_ids if job_ids is not None else self.job_ids()), items=items, counts=counts)

    def counts(self, jobs: Iterable[str] | None = None) -> dict[str, int]:
        where, args = self._job_filter(list(jobs) if jobs is not None else None, "items")
        with self._connect() as con:
            rows = con.execute("SELECT state, COUNT(*) AS n FROM items WHERE 1 = 1" + where + " GROUP BY state",
                               args).fetchall()
        counts = {state: 0 for state in STATES}
        counts.update({r["state"]: r["n"] for r in rows})
        return counts


def _item(row: sqlite3.Row) -> Item:
    return Item(id=row["id"], kind=row["kind"], group=row["grp"], order=row["ord"], label=row["label"],
                payload=json.loads(row["payload"]), depends_on=row["depends_on"])


def _row(row: sqlite3.Row) -> ItemRow:
    return ItemRow(
        item=_item(row), state=row["state"], attempts=row["attempts"], max_attempts=row["max_attempts"],
        error=row["error"], error_kind=row["error_kind"], outputs=tuple(json.loads(row["outputs"])),
        meta=json.loads(row["meta"]), created=row["created"], started=row["started"], finished=row["finished"],
        seconds=row["seconds"], worker=row["worker"], lease_until=row["lease_until"], not_before=row["not_before"],
    )
