"""The service database (SQLite, WAL, beside the studio store): tenants (with their quota and
retention overrides), their access tokens, and which identity, job and asset belongs to whom;
which identities each job uses (`job_identities`: erasure finds a group picture's second
person too); images submitted per day; and the audit log of erasures.

Tokens are 256-bit random strings shown once; only their SHA-256 is stored. (A slow password
hash buys nothing for a token with 256 bits of entropy, and a lookup by hash keeps every
request one indexed read.) Ids of identities, jobs and assets are random too, so one tenant
cannot guess another's; every lookup here takes the tenant, so none can reach across. The one
deliberate exception is erasure: `jobs_using` / `delete_identity` find every job that used
an identity, whichever tenant made it (rows written before tenant scope was enforced).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import re
import secrets
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from portrait.core.db import connect, opening
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
CREATE TABLE IF NOT EXISTS job_identities (job TEXT NOT NULL, identity TEXT NOT NULL, PRIMARY KEY (job, identity));
CREATE TABLE IF NOT EXISTS assets (
    id TEXT PRIMARY KEY, tenant TEXT NOT NULL, kind TEXT NOT NULL, label TEXT NOT NULL, file TEXT NOT NULL,
    bytes INTEGER NOT NULL, width INTEGER NOT NULL, height INTEGER NOT NULL, created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS job_assets (job TEXT NOT NULL, asset TEXT NOT NULL, PRIMARY KEY (job, asset));
CREATE TABLE IF NOT EXISTS usage (tenant TEXT NOT NULL, day TEXT NOT NULL, images INTEGER NOT NULL,
                                  PRIMARY KEY (tenant, day));
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, tenant TEXT NOT NULL, time REAL NOT NULL, action TEXT NOT NULL,
    subject TEXT NOT NULL, counts TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS identities_tenant ON identities (tenant, created);
CREATE INDEX IF NOT EXISTS jobs_tenant ON jobs (tenant, created);
CREATE INDEX IF NOT EXISTS job_identities_identity ON job_identities (identity);
CREATE INDEX IF NOT EXISTS job_assets_asset ON job_assets (asset);
CREATE INDEX IF NOT EXISTS assets_tenant ON assets (tenant, created);
CREATE INDEX IF NOT EXISTS audit_tenant ON audit (tenant, seq);
"""
# Columns added after the first release (a database of an older server gains them on open).
_COLUMNS = {"tenants": {"settings": "TEXT NOT NULL DEFAULT '{}'"}, "identities": {"expired": "REAL"}}


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
    expired: float | None = None  # when retention erased its photos (and all made from them)


@dataclass(frozen=True)
class JobRow:
    id: str
    tenant: str
    kind: str  # train | generate | batch
    store_job: str
    identities: tuple[str, ...]  # every identity the job uses (a group picture's second person too)
    params: dict[str, Any]
    created: float


@dataclass(frozen=True)
class AssetRow:
    id: str
    tenant: str
    kind: str  # image
    label: str  # the client's file name, a label only
    file: str  # the stored file's name in the asset's folder (ours: image.<ext>)
    bytes: int
    width: int
    height: int
    created: float


def utc_day(when: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(when))


class TenantDB:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with opening(self.path), self._connect() as con:
            con.execute("PRAGMA journal_mode=WAL")
            con.executescript(_SCHEMA)
            for table, columns in _COLUMNS.items():
                have = {r["name"] for r in con.execute(f"PRAGMA table_info({table})")}
                for column, decl in columns.items():
                    if column not in have:
                        con.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
            self._backfill_job_identities(con)

    def _connect(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return connect(self.path)

    @staticmethod
    def _backfill_job_identities(con: sqlite3.Connection) -> None:
        """Jobs written by an older server name their people in JSON only (a group picture's
        second person sat in params.options.identities): index them, so erasure finds them."""
        rows = con.execute("SELECT id, identities, params FROM jobs WHERE id NOT IN"
                           " (SELECT job FROM job_identities)").fetchall()
        for row in rows:
            params = json.loads(row["params"])
            named = list(json.loads(row["identities"]))
            named += list(((params.get("generate") or {}).get("options") or {}).get("identities") or [])
            named += list((params.get("options") or {}).get("identities") or []) + list(params.get("with_identity") or [])
            for identity in dict.fromkeys(str(n) for n in named):
                con.execute("INSERT OR IGNORE INTO job_identities (job, identity) VALUES (?, ?)", (row["id"], identity))

    # -- tenants and tokens -------------------------------------------------------------

    def has_tokens(self) -> bool:
        with self._connect() as con:
            return con.execute("SELECT 1 FROM tokens LIMIT 1").fetchone() is not None

    def create_token(self, name: str) -> tuple[Tenant, str]:
        """A new token for tenant `name` (created when new). The token is returned once, never stored."""
        check_tenant_name(name)
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        now = time.time()
        with self._connect() as con:
            con.execute("BEGIN IMMEDIATE")
            tenant_id = self._tenant_id(con, name, now)
            con.execute("INSERT INTO tokens (hash, tenant, created) VALUES (?, ?, ?)", (hash_token(token), tenant_id, now))
            con.execute("COMMIT")
        return Tenant(tenant_id, name), token

    @staticmethod
    def _tenant_id(con: sqlite3.Connection, name: str, now: float) -> str:
        row = con.execute("SELECT id FROM tenants WHERE name = ?", (name,)).fetchone()
        if row is not None:
            return row["id"]
        tenant_id = LOCAL_TENANT if name == LOCAL_TENANT else new_id("t")
        con.execute("INSERT INTO tenants (id, name, created) VALUES (?, ?, ?)", (tenant_id, name, now))
        return tenant_id

    def revoke_tokens(self, name: str) -> int:
        """Delete every token of tenant `name`. Its data stays; nobody can act as it until a new token."""
        with self._connect() as con:
            return con.execute("DELETE FROM tokens WHERE tenant IN (SELECT id FROM tenants WHERE name = ?)",
                               (name,)).rowcount

    def tenants(self) -> list[dict[str, Any]]:
        with self._connect() as con:
            rows = con.execute("SELECT t.id, t.name, t.created, t.settings, COUNT(k.hash) AS tokens FROM tenants t"
                               " LEFT JOIN tokens k ON k.tenant = t.id GROUP BY t.id ORDER BY t.created").fetchall()
        return [{**dict(r), "settings": json.loads(r["settings"])} for r in rows]

    def tenant_for_token(self, token: str) -> Tenant | None:
        with self._connect() as con:
            row = con.execute("SELECT t.id, t.name FROM tokens k JOIN tenants t ON t.id = k.tenant WHERE k.hash = ?",
                              (hash_token(token),)).fetchone()
        return Tenant(row["id"], row["name"]) if row else None

    def tenant_name(self, tenant_id: str) -> str:
        with self._connect() as con:
            row = con.execute("SELECT name FROM tenants WHERE id = ?", (tenant_id,)).fetchone()
        return row["name"] if row else tenant_id

    def tenant_settings(self, tenant_id: str) -> dict[str, Any]:
        """The tenant's overrides of TenantPolicy (only the keys an operator set)."""
        with self._connect() as con:
            row = con.execute("SELECT settings FROM tenants WHERE id = ?", (tenant_id,)).fetchone()
        return json.loads(row["settings"]) if row else {}

    def set_tenant_settings(self, name: str, values: dict[str, Any], *, create: bool = False) -> str:
        """Store the overrides of tenant `name` (a value None removes a key). Returns its id."""
        if name != LOCAL_TENANT:
            check_tenant_name(name)
        with self._connect() as con:
            con.execute("BEGIN IMMEDIATE")
            row = con.execute("SELECT id, settings FROM tenants WHERE name = ?", (name,)).fetchone()
            if row is None and not (create or name == LOCAL_TENANT):
                con.execute("ROLLBACK")
                raise BadInput(f"tenant '{name}': no such tenant (create one with `portrait serve token create {name}`)")
            tenant_id = row["id"] if row else self._tenant_id(con, name, time.time())
            merged = {**(json.loads(row["settings"]) if row else {}), **values}
            merged = {k: v for k, v in merged.items() if v is not None}
            con.execute("UPDATE tenants SET settings = ? WHERE id = ?", (json.dumps(merged, sort_keys=True), tenant_id))
            con.execute("COMMIT")
        return tenant_id

    def tenant_ids(self) -> list[str]:
        """Every tenant that owns something or has settings (the sweeper's round)."""
        with self._connect() as con:
            rows = con.execute("SELECT id FROM tenants UNION SELECT tenant FROM identities UNION SELECT tenant FROM jobs"
                               " UNION SELECT tenant FROM assets").fetchall()
        return sorted(r[0] for r in rows)

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

    def expire_identity(self, tenant: str, identity_id: str, when: float) -> None:
        """Retention erased the photos: the row stays (its results may outlive it), the report goes."""
        with self._connect() as con:
            con.execute("UPDATE identities SET expired = ?, report = ? WHERE id = ? AND tenant = ?",
                        (when, json.dumps({"photos": [], "kept": 0, "rejected": 0}), identity_id, tenant))

    def jobs_using(self, identity_id: str) -> list[JobRow]:
        """Every job, of any tenant, that used the identity in any role."""
        with self._connect() as con:
            rows = con.execute("SELECT j.* FROM jobs j JOIN job_identities u ON u.job = j.id WHERE u.identity = ?",
                               (identity_id,)).fetchall()
        return [_job(r) for r in rows]

    def delete_identity(self, tenant: str, identity_id: str) -> tuple[list[JobRow], int]:
        """Remove the identity and every job, of any tenant, that used it; returns those jobs
        (their files go too) and how many rows were deleted."""
        with self._connect() as con:
            con.execute("BEGIN IMMEDIATE")
            gone = [_job(r) for r in con.execute("SELECT j.* FROM jobs j JOIN job_identities u ON u.job = j.id"
                                                 " WHERE u.identity = ?", (identity_id,)).fetchall()]
            rows = self._delete_jobs(con, [j.id for j in gone])
            rows += con.execute("DELETE FROM job_identities WHERE identity = ?", (identity_id,)).rowcount
            rows += con.execute("DELETE FROM identities WHERE id = ? AND tenant = ?", (identity_id, tenant)).rowcount
            con.execute("COMMIT")
        return gone, rows

    # -- jobs ---------------------------------------------------------------------------

    def add_job(self, job: JobRow, assets: tuple[str, ...] = ()) -> None:
        with self._connect() as con:
            con.execute("BEGIN IMMEDIATE")
            con.execute("INSERT INTO jobs (id, tenant, kind, store_job, identities, params, created)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (job.id, job.tenant, job.kind, job.store_job, json.dumps(list(job.identities)),
                         json.dumps(job.params), job.created))
            for identity in dict.fromkeys(job.identities):
                con.execute("INSERT OR IGNORE INTO job_identities (job, identity) VALUES (?, ?)", (job.id, identity))
            for asset in dict.fromkeys(assets):
                con.execute("INSERT OR IGNORE INTO job_assets (job, asset) VALUES (?, ?)", (job.id, asset))
            con.execute("COMMIT")

    def job(self, tenant: str, job_id: str) -> JobRow | None:
        with self._connect() as con:
            row = con.execute("SELECT * FROM jobs WHERE id = ? AND tenant = ?", (job_id, tenant)).fetchone()
        return _job(row) if row else None

    def jobs(self, tenant: str, limit: int = 200, after: JobRow | None = None) -> list[JobRow]:
        """The tenant's jobs, newest first; `after`: the page after this job (keyset paging:
        a page does not shift when new jobs arrive)."""
        where, args = "", []
        if after is not None:
            where, args = " AND (created < ? OR (created = ? AND id < ?))", [after.created, after.created, after.id]
        with self._connect() as con:
            rows = con.execute("SELECT * FROM jobs WHERE tenant = ?" + where + " ORDER BY created DESC, id DESC LIMIT ?",
                               (tenant, *args, limit)).fetchall()
        return [_job(r) for r in rows]

    def all_jobs(self, tenant: str) -> list[JobRow]:
        with self._connect() as con:
            rows = con.execute("SELECT * FROM jobs WHERE tenant = ? ORDER BY created", (tenant,)).fetchall()
        return [_job(r) for r in rows]

    def delete_job(self, tenant: str, job_id: str) -> int:
        with self._connect() as con:
            con.execute("BEGIN IMMEDIATE")
            if con.execute("SELECT 1 FROM jobs WHERE id = ? AND tenant = ?", (job_id, tenant)).fetchone() is None:
                con.execute("ROLLBACK")
                return 0
            rows = self._delete_jobs(con, [job_id])
            con.execute("COMMIT")
        return rows

    @staticmethod
    def _delete_jobs(con: sqlite3.Connection, job_ids: list[str]) -> int:
        rows = 0
        for job_id in job_ids:
            rows += con.execute("DELETE FROM jobs WHERE id = ?", (job_id,)).rowcount
            rows += con.execute("DELETE FROM job_identities WHERE job = ?", (job_id,)).rowcount
            rows += con.execute("DELETE FROM job_assets WHERE job = ?", (job_id,)).rowcount
            rows += con.execute("UPDATE identities SET train_job = NULL WHERE train_job = ?", (job_id,)).rowcount
        return rows

    # -- assets -------------------------------------------------------------------------

    def add_asset(self, asset: AssetRow) -> None:
        with self._connect() as con:
            con.execute("INSERT INTO assets (id, tenant, kind, label, file, bytes, width, height, created)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", dataclasses.astuple(asset))

    def asset(self, tenant: str, asset_id: str) -> AssetRow | None:
        with self._connect() as con:
            row = con.execute("SELECT * FROM assets WHERE id = ? AND tenant = ?", (asset_id, tenant)).fetchone()
        return AssetRow(**dict(row)) if row else None

    def assets(self, tenant: str) -> list[AssetRow]:
        with self._connect() as con:
            rows = con.execute("SELECT * FROM assets WHERE tenant = ? ORDER BY created", (tenant,)).fetchall()
        return [AssetRow(**dict(r)) for r in rows]

    def jobs_with_asset(self, asset_id: str) -> list[str]:
        with self._connect() as con:
            return [r["job"] for r in con.execute("SELECT job FROM job_assets WHERE asset = ?", (asset_id,))]

    def delete_asset(self, tenant: str, asset_id: str) -> int:
        with self._connect() as con:
            con.execute("BEGIN IMMEDIATE")
            rows = con.execute("DELETE FROM assets WHERE id = ? AND tenant = ?", (asset_id, tenant)).rowcount
            if rows:
                rows += con.execute("DELETE FROM job_assets WHERE asset = ?", (asset_id,)).rowcount
            con.execute("COMMIT")
        return rows

    # -- usage and the audit log ----------------------------------------------------------

    def images_today(self, tenant: str, now: float) -> int:
        with self._connect() as con:
            row = con.execute("SELECT images FROM usage WHERE tenant = ? AND day = ?", (tenant, utc_day(now))).fetchone()
        return int(row["images"]) if row else 0

    def count_images(self, tenant: str, images: int, now: float) -> None:
        with self._connect() as con:
            con.execute("INSERT INTO usage (tenant, day, images) VALUES (?, ?, ?) ON CONFLICT(tenant, day)"
                        " DO UPDATE SET images = images + excluded.images", (tenant, utc_day(now), images))

    def add_audit(self, tenant: str, action: str, subject: str, counts: dict[str, Any], when: float) -> None:
        """One line of the audit log: who (tenant id), what (action, the object's id) and how
        much went. Never a name, a photo or an embedding: the log outlives what it records."""
        with self._connect() as con:
            con.execute("INSERT INTO audit (tenant, time, action, subject, counts) VALUES (?, ?, ?, ?, ?)",
                        (tenant, when, action, subject, json.dumps(counts, sort_keys=True)))

    def audit(self, tenant: str, limit: int = 100) -> list[dict[str, Any]]:
        with self._connect() as con:
            rows = con.execute("SELECT * FROM audit WHERE tenant = ? ORDER BY seq DESC LIMIT ?", (tenant, limit)).fetchall()
        return [{"time": r["time"], "action": r["action"], "subject": r["subject"], "counts": json.loads(r["counts"])}
                for r in rows]


def check_tenant_name(name: str) -> str:
    if not _TENANT_NAME.match(name or "") or name == LOCAL_TENANT:
        raise BadInput(f"tenant name '{name}': use 1-64 letters, digits, '_', '-' or '.' "
                       f"(not '{LOCAL_TENANT}'), starting with a letter or digit")
    return name


def _identity(row: sqlite3.Row) -> IdentityRow:
    return IdentityRow(row["id"], row["tenant"], row["name"], row["created"], json.loads(row["report"]),
                       row["train_job"], row["expired"])


def _job(row: sqlite3.Row) -> JobRow:
    return JobRow(row["id"], row["tenant"], row["kind"], row["store_job"], tuple(json.loads(row["identities"])),
                  json.loads(row["params"]), row["created"])
