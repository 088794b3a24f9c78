"""The results history: every portrait made of an identity, across runs, in one index.

A studio's customer comes back for the portraits of last week's shoot, stars the ones they
like, downloads a selection and deletes the rest. The images live where their run wrote them
(a `--out` folder, a batch spec's output tree, the service's job folders); this index, one
SQLite file at `HOME/results.db`, remembers each of them with what made it and how it
scored, so they can be listed per identity, newest first, whatever run made them:

    history = History(settings)
    page = history.page("ana", page=1)              # rows with job, backend, template, cell, scores, star
    history.star("ana", [row.id for row in page.rows[:2]])
    data = history.zip("ana", ids)                  # the selection and its results.json
    history.delete("ana", ids)                      # the files and their rows

Every call names the identity and touches only that identity's rows: an id of another
identity is unknown (`UnknownResult`), which is what lets the service expose it per tenant.
The generate flow, the shoot flow and the batch executor record what they publish
(`record`); a run also stores its report (the keep report of `--keep`, warnings) in `runs`.
Paths are never part of a row's public form (`ResultRow.as_dict`); the service serves files
by id (docs/ARCHITECTURE.md#results-history).
"""

from __future__ import annotations

import io
import json
import secrets
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from portrait.core.config import Settings
from portrait.core.db import connect
from portrait.core.errors import BadInput

HISTORY_FILE = "results.db"
MAX_PAGE = 100  # rows per page
MAX_SELECTION = 500  # results per star/zip/delete call

_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    id TEXT PRIMARY KEY,
    identity TEXT NOT NULL,
    job TEXT NOT NULL,
    created REAL NOT NULL,
    folder TEXT NOT NULL,
    file TEXT NOT NULL,
    backend TEXT,
    template TEXT,
    cell TEXT,
    seed INTEGER,
    rank INTEGER,
    similarity REAL,
    space TEXT,
    passed_gate INTEGER,
    copy_paste TEXT,
    row TEXT NOT NULL,
    starred INTEGER NOT NULL DEFAULT 0,
    UNIQUE (folder, file)
);
CREATE INDEX IF NOT EXISTS results_by_identity ON results (identity, created);
CREATE TABLE IF NOT EXISTS runs (
    job TEXT NOT NULL,
    identity TEXT NOT NULL,
    cell TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    backend TEXT,
    template TEXT,
    report TEXT NOT NULL,
    PRIMARY KEY (job, identity, cell)
);
"""


class UnknownResult(BadInput):
    """A result id this identity does not have (the service answers 404)."""


def new_run_id() -> str:
    """The job id a CLI or Python API run records its results under."""
    return "r" + secrets.token_hex(6)


@dataclass(frozen=True)
class ResultRow:
    id: str
    identity: str
    job: str
    created: float
    folder: Path
    file: str
    backend: str | None
    template: str | None
    cell: str | None
    seed: int | None
    rank: int | None
    similarity: float | None
    space: str | None
    passed_gate: bool | None
    copy_paste: str | None
    starred: bool
    row: dict[str, Any] = field(default_factory=dict)  # the results.json row (scores, timings, info)

    @property
    def path(self) -> Path:
        return self.folder / self.file

    @property
    def present(self) -> bool:
        return self.path.is_file()

    def as_dict(self) -> dict[str, Any]:
        """The public form: no server path (a client asks for the file by id)."""
        return {"id": self.id, "identity": self.identity, "job": self.job, "created": self.created,
                "backend": self.backend, "template": self.template, "cell": self.cell, "seed": self.seed,
                "rank": self.rank, "similarity": self.similarity, "similarity_space": self.space,
                "passed_gate": self.passed_gate, "copy_paste": self.copy_paste, "starred": self.starred,
                "present": self.present, "scores": self.row.get("scores") or {},
                "reference_similarity": self.row.get("reference_similarity"), "clip_t": self.row.get("clip_t"),
                "faces": self.row.get("faces"), "face_quality": self.row.get("face_quality"),
                "keep": (self.row.get("info") or {}).get("keep")}


@dataclass(frozen=True)
class ResultsPage:
    rows: tuple[ResultRow, ...]
    total: int
    page: int
    per_page: int

    def as_dict(self) -> dict[str, Any]:
        return {"results": [r.as_dict() for r in self.rows], "total": self.total, "page": self.page,
                "per_page": self.per_page, "pages": max(1, -(-self.total // self.per_page))}


def _result(row: Mapping[str, Any]) -> ResultRow:
    return ResultRow(id=row["id"], identity=row["identity"], job=row["job"], created=row["created"],
                     folder=Path(row["folder"]), file=row["file"], backend=row["backend"], template=row["template"],
                     cell=row["cell"], seed=row["seed"], rank=row["rank"], similarity=row["similarity"],
                     space=row["space"], passed_gate=None if row["passed_gate"] is None else bool(row["passed_gate"]),
                     copy_paste=row["copy_paste"], starred=bool(row["starred"]), row=json.loads(row["row"]))


class History:
    """The results index of one HOME (see the module docstring)."""

    def __init__(self, settings: Settings | Path | str | None = None):
        settings = settings if settings is not None else Settings()
        home = settings.home if isinstance(settings, Settings) else Path(settings).expanduser()
        self.path = Path(home) / HISTORY_FILE
        self._ready = False

    def _db(self):
        if not self._ready:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with connect(self.path) as con:
                con.execute("PRAGMA journal_mode=WAL")
                con.executescript(_SCHEMA)
            self._ready = True
        return connect(self.path)

    # -- writing -------------------------------------------------------------------------------

    def record(self, *, identity: str, job: str, folder: Path | str, rows: Sequence[Mapping[str, Any]],
               backend: str | None, template: str | None, cell: str | None = None,
               report: Mapping[str, Any] | None = None, files: Sequence[str] | None = None,
               whole_folder: bool = False) -> list[str]:
        """Add a run's published results (results.json rows; `files` names each row's file when it
        differs from the row's `path`). A file already indexed keeps its id and star, its row is
        updated (a rerun into the same folder). `whole_folder`: the run replaced its folder whole
        (generate's --out), so rows of files it no longer holds go. Returns the ids, in row order."""
        folder = Path(folder).resolve()
        now = time.time()
        ids = []
        names = [files[i] if files is not None else row.get("path") for i, row in enumerate(rows)]
        with self._db() as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                if whole_folder:
                    marks = ",".join("?" * len(names))
                    con.execute(f"DELETE FROM results WHERE folder = ? AND file NOT IN ({marks})",
                                (str(folder), *[n for n in names if n]))
                for row, file in zip(rows, names):
                    if not file:
                        continue
                    found = con.execute("SELECT id FROM results WHERE folder = ? AND file = ?",
                                        (str(folder), file)).fetchone()
                    rid = found["id"] if found else secrets.token_hex(8)
                    values = (identity, job, now, backend, template, cell, row.get("seed"), row.get("rank"),
                              row.get("similarity"), row.get("similarity_space"),
                              None if row.get("passed_gate") is None else int(bool(row.get("passed_gate"))),
                              row.get("copy_paste"), json.dumps(dict(row), default=str))
                    if found:
                        con.execute("UPDATE results SET identity=?, job=?, created=?, backend=?, template=?, cell=?, "
                                    "seed=?, rank=?, similarity=?, space=?, passed_gate=?, copy_paste=?, row=? "
                                    "WHERE id=?", (*values, rid))
                    else:
                        con.execute("INSERT INTO results (identity, job, created, backend, template, cell, seed, rank, "
                                    "similarity, space, passed_gate, copy_paste, row, id, folder, file) "
                                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                    (*values, rid, str(folder), file))
                    ids.append(rid)
                if report is not None:
                    con.execute("INSERT OR REPLACE INTO runs (job, identity, cell, created, backend, template, report) "
                                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                                (job, identity, cell or "", now, backend, template, json.dumps(dict(report), default=str)))
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
        return ids

    # -- reading -------------------------------------------------------------------------------

    def page(self, identity: str, *, page: int = 1, per_page: int = 24, job: str | None = None,
             starred: bool | None = None) -> ResultsPage:
        """One page of an identity's results: newest job first, by cell and best rank within a job."""
        if page < 1:
            raise BadInput(f"page {page}: pages start at 1")
        if not 1 <= per_page <= MAX_PAGE:
            raise BadInput(f"per_page {per_page}: use 1-{MAX_PAGE}")
        where, args = ["identity = ?"], [identity]
        if job is not None:
            where.append("job = ?")
            args.append(job)
        if starred is not None:
            where.append("starred = ?")
            args.append(int(starred))
        clause = " AND ".join(where)
        with self._db() as con:
            total = con.execute(f"SELECT COUNT(*) FROM results WHERE {clause}", args).fetchone()[0]
            # a job's rows together (newest job first), then by cell and rank within it
            rows = con.execute(f"SELECT results.*, MAX(created) OVER (PARTITION BY job) AS job_time FROM results "
                               f"WHERE {clause} ORDER BY job_time DESC, job, cell, rank, file LIMIT ? OFFSET ?",
                               (*args, per_page, (page - 1) * per_page)).fetchall()
        return ResultsPage(tuple(_result(r) for r in rows), int(total), page, per_page)

    def get(self, identity: str, ids: Iterable[str]) -> list[ResultRow]:
        """The identity's results by id, in the order asked; an id it does not have is refused."""
        wanted = list(dict.fromkeys(str(i) for i in ids))
        if not wanted:
            raise BadInput("no result chosen")
        if len(wanted) > MAX_SELECTION:
            raise BadInput(f"{len(wanted)} results chosen; at most {MAX_SELECTION} at a time")
        with self._db() as con:
            marks = ",".join("?" * len(wanted))
            found = {r["id"]: _result(r) for r in con.execute(
                f"SELECT * FROM results WHERE identity = ? AND id IN ({marks})", (identity, *wanted)).fetchall()}
        missing = [i for i in wanted if i not in found]
        if missing:
            raise UnknownResult(f"result '{missing[0]}' not found")
        return [found[i] for i in wanted]

    def runs(self, identity: str, job: str | None = None) -> list[dict[str, Any]]:
        """The stored run reports (keep report, warnings) of an identity, newest first."""
        where, args = "identity = ?", [identity]
        if job is not None:
            where += " AND job = ?"
            args.append(job)
        with self._db() as con:
            rows = con.execute(f"SELECT * FROM runs WHERE {where} ORDER BY created DESC, cell", args).fetchall()
        return [{"job": r["job"], "cell": r["cell"] or None, "created": r["created"], "backend": r["backend"],
                 "template": r["template"], **json.loads(r["report"])} for r in rows]

    def jobs(self, identity: str) -> list[str]:
        with self._db() as con:
            return [r[0] for r in con.execute("SELECT job FROM results WHERE identity = ? GROUP BY job "
                                              "ORDER BY MAX(created) DESC", (identity,)).fetchall()]

    # -- acting on a selection ---------------------------------------------------------------------

    def star(self, identity: str, ids: Iterable[str], on: bool = True) -> int:
        rows = self.get(identity, ids)
        with self._db() as con:
            con.execute("BEGIN IMMEDIATE")
            con.executemany("UPDATE results SET starred = ? WHERE id = ? AND identity = ?",
                            [(int(on), r.id, identity) for r in rows])
            con.execute("COMMIT")
        return len(rows)

    def zip(self, identity: str, ids: Iterable[str], read: Callable[[Path], bytes] | None = None) -> bytes:
        """The chosen images (those still on disk) and a results.json describing them, as a zip;
        `read` gives each image's bytes (default: the file's; the service strips its paths)."""
        rows = [r for r in self.get(identity, ids) if r.present]
        if not rows:
            raise UnknownResult("none of the chosen results is on disk any more")
        buffer = io.BytesIO()
        listing = []
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as zf:  # PNGs are compressed already
            for index, r in enumerate(rows, 1):
                label = (r.cell or r.template or "prompt").replace("/", "-")
                name = f"{index:03d}_{label}_s{r.seed}{r.path.suffix.lower()}"
                if read is None:
                    zf.write(r.path, name)
                else:
                    zf.writestr(name, read(r.path))
                listing.append({**r.as_dict(), "file": name})
            zf.writestr("results.json", json.dumps({"identity": identity, "results": listing}, indent=2, default=str))
        return buffer.getvalue()

    def delete(self, identity: str, ids: Iterable[str]) -> dict[str, Any]:
        """Remove the chosen images and their rows; the run folder's results.json stops listing them."""
        from portrait.core.io import write_json

        rows = self.get(identity, ids)
        removed = 0
        by_folder: dict[Path, set[str]] = {}
        for r in rows:
            if r.path.is_file():
                r.path.unlink()
                removed += 1
            by_folder.setdefault(r.folder, set()).add(r.file)
        for folder, files in by_folder.items():
            listing = folder / "results.json"
            try:
                data = json.loads(listing.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(data, dict) and isinstance(data.get("results"), list):
                data["results"] = [row for row in data["results"] if row.get("path") not in files]
                write_json(listing, data)
        with self._db() as con:
            con.execute("BEGIN IMMEDIATE")
            con.executemany("DELETE FROM results WHERE id = ? AND identity = ?", [(r.id, identity) for r in rows])
            con.execute("COMMIT")
        return {"deleted": [r.id for r in rows], "files_removed": removed, "time": time.time()}

    def forget_job(self, job: str) -> int:
        """Drop every row of a job (its files were erased by the caller)."""
        if not self.path.is_file():
            return 0
        with self._db() as con:
            con.execute("BEGIN IMMEDIATE")
            gone = con.execute("DELETE FROM results WHERE job = ?", (job,)).rowcount
            con.execute("DELETE FROM runs WHERE job = ?", (job,))
            con.execute("COMMIT")
        return int(gone)

    def forget(self, identity: str) -> int:
        """Drop every row of an identity (its erasure: the caller removes the files it owns)."""
        if not self.path.is_file():
            return 0
        with self._db() as con:
            con.execute("BEGIN IMMEDIATE")
            gone = con.execute("DELETE FROM results WHERE identity = ?", (identity,)).rowcount
            con.execute("DELETE FROM runs WHERE identity = ?", (identity,))
            con.execute("COMMIT")
        return int(gone)


def record_generation(settings: Settings, result: Any, *, job: str, cell: str | None = None,
                      files: Sequence[str] | None = None, folder: Path | None = None) -> list[str]:
    """Index a published GenerationResult (portrait.flows.generate) under `job`: with `files`,
    placed into `folder` under those names (a batch item); else its own --out, replaced whole."""
    document = result.as_json()
    report = {key: document[key] for key in ("keep", "warnings") if key in document}
    return History(settings).record(identity=result.identity, job=job, folder=folder or result.out,
                                    rows=document["results"], backend=result.backend, template=result.template,
                                    cell=cell, report=report, files=files, whole_folder=files is None)
