"""The service database (SQLite, WAL, beside the studio store): tenants, their access tokens,
and which identity and job belongs to whom.

Tokens are 256-bit random strings shown once; only their SHA-256 is stored. (A slow password
hash buys nothing for a token with 256 bits of entropy, and a lookup by hash keeps every
request one indexed read.) Ids of identities and jobs are random too, so one tenant cannot
guess another's; every query here takes the tenant, so none can reach across.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import secrets
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from portrait.core.db import connect
from portrait.core.errors import BadInput

LOCAL_TENANT = "local"  # the single tenant of a server without tokens
TOKEN_PREFIX = "pt_"
_TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tenants (id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS tokens (hash TEXT PRIMARY KEY, tenant TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS identities (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, name TEXT NOT NULL, created REAL NOT NULL,
    report TEXT NOT NULL, train_job TEXT
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, kind TEXT NOT NULL, store_job TEXT NOT NULL,
    identities TEXT NOT NULL, params TEXT NOT NULL, created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS identities_tenant ON identities (tenant, created);
CREATE INDEX IF NOT EXISTS jobs_tenant ON jobs (tenant, created);
"""


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_id(prefix: str) -> str:
    """A random id that is also a valid identity name (portrait.core.bundle.check_name)."""
    return f"{prefix}{secrets.token_hex(8)}"


@dataclass(frozen=True)
class Tenant:
    id: str
    name: str


@dataclass(frozen=True)
class IdentityRow:
    id: str
    tenant: str
    name: str
    created: float
    report: dict[str, Any]
    train_job: str | None


@dataclass(frozen=True)
class JobRow:
    id: str
    tenant: str
    kind: str  # train | generate | batch
    store_job: str
    identities: tuple[str, ...]
    params: dict[str, Any]
    created: float


class TenantDB:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as con:
            con.execute("PRAGMA journal_mode=WAL")
            con.executescript(_SCHEMA)

    def _connect(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return connect(self.path)

    # -- tenants and tokens -------------------------------------------------------------

    def has_tokens(self) -> bool:
        with self._connect() as con:
            return con.execute("SELECT 1 FROM tokens LIMIT 1").fetchone() is not None

    def create_token(self, name: str) -> tuple[Tenant, str]:
        """A new token for tenant `name` (created when new). The token is returned once, never stored."""
        if not _TENANT_NAME.match(name or "") or name == LOCAL_TENANT:
            raise BadInput(f"tenant name '{name}': use 1-64 letters, digits, '_', '-' or '.' "
                           f"(not '{LOCAL_TENANT}'), starting with a letter or digit")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        now = time.time()
        with self._connect() as con:
            con.execute("BEGIN IMMEDIATE")
            row = con.execute("SELECT id FROM tenants WHERE name = ?", (name,)).fetchone()
            tenant_id = row["id"] if row else new_id("t")
            if row is None:
                con.execute("INSERT INTO tenants (id, name, created) VALUES (?, ?, ?)", (tenant_id, name, now))
            con.execute("INSERT INTO tokens (hash, tenant, created) VALUES (?, ?, ?)", (hash_token(token), tenant_id, now))
            con.execute("COMMIT")
        return Tenant(tenant_id, name), token

    def revoke_tokens(self, name: str) -> int:
        with self._connect() as con:
            return con.execute("DELETE FROM tokens WHERE tenant IN (SELECT id FROM tenants WHERE name = ?)",
                               (name,)).rowcount

    def tenants(self) -> list[dict[str, Any]]:
        with self._connect() as con:
            rows = con.execute("SELECT t.id, t.name, t.created, COUNT(k.hash) AS tokens FROM tenants t"
                               " LEFT JOIN tokens k ON k.tenant = t.id GROUP BY t.id ORDER BY t.created").fetchall()
        return [dict(r) for r in rows]

    def tenant_for_token(self, token: str) -> Tenant | None:
        with self._connect() as con:
            row = con.execute("SELECT t.id, t.name FROM tokens k JOIN tenants t ON t.id = k.tenant WHERE k.hash = ?",
                              (hash_token(token),)).fetchone()
        return Tenant(row["id"], row["name"]) if row else None

    # -- identities ---------------------------------------------------------------------

    def add_identity(self, tenant: str, identity_id: str, name: str, report: dict[str, Any]) -> None:
        with self._connect() as con:
            con.execute("INSERT INTO identities (id, tenant, name, created, report) VALUES (?, ?, ?, ?, ?)",
                        (identity_id, tenant, name, time.time(), json.dumps(report)))

    def identity(self, tenant: str, identity_id: str) -> IdentityRow | None:
        with self._connect() as con:
            row = con.execute("SELECT * FROM identities WHERE id = ? AND tenant = ?", (identity_id, tenant)).fetchone()
        return _identity(row) if row else None

    def identities(self, tenant: str) -> list[IdentityRow]:
        with self._connect() as con:
            rows = con.execute("SELECT * FROM identities WHERE tenant = ? ORDER BY created", (tenant,)).fetchall()
        return [_identity(r) for r in rows]

    def set_train_job(self, tenant: str, identity_id: str, job_id: str) -> None:
        with self._connect() as con:
            con.execute("UPDATE identities SET train_job = ? WHERE id = ? AND tenant = ?", (job_id, identity_id, tenant))

    def delete_identity(self, tenant: str, identity_id: str) -> list[JobRow]:
        """Remove the identity and every job that used it; returns those jobs (their files go too)."""
        with self._connect() as con:
            con.execute("BEGIN IMMEDIATE")
            jobs = [_job(r) for r in con.execute("SELECT * FROM jobs WHERE tenant = ?", (tenant,)).fetchall()]
            gone = [j for j in jobs if identity_id in j.identities]
            for job in gone:
                con.execute("DELETE FROM jobs WHERE id = ?", (job.id,))
            con.execute("DELETE FROM identities WHERE id = ? AND tenant = ?", (identity_id, tenant))
            con.execute("COMMIT")
        return gone

    # -- jobs ---------------------------------------------------------------------------

    def add_job(self, job: JobRow) -> None:
        with self._connect() as con:
            con.execute("INSERT INTO jobs (id, tenant, kind, store_job, identities, params, created)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (job.id, job.tenant, job.kind, job.store_job, json.dumps(list(job.identities)),
                         json.dumps(job.params), job.created))

    def job(self, tenant: str, job_id: str) -> JobRow | None:
        with self._connect() as con:
            row = con.execute("SELECT * FROM jobs WHERE id = ? AND tenant = ?", (job_id, tenant)).fetchone()
        return _job(row) if row else None

    def jobs(self, tenant: str, limit: int = 200) -> list[JobRow]:
        with self._connect() as con:
            rows = con.execute("SELECT * FROM jobs WHERE tenant = ? ORDER BY created DESC LIMIT ?",
                               (tenant, limit)).fetchall()
        return [_job(r) for r in rows]


def _identity(row: sqlite3.Row) -> IdentityRow:
    return IdentityRow(row["id"], row["tenant"], row["name"], row["created"], json.loads(row["report"]),
                       row["train_job"])


def _job(row: sqlite3.Row) -> JobRow:
    return JobRow(row["id"], row["tenant"], row["kind"], row["store_job"], tuple(json.loads(row["identities"])),
                  json.loads(row["params"]), row["created"])
