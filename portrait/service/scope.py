"""Tenant scope as a type: every id a request names is turned into a handle here, or into 404.

`Scope.resolve(tenant, kind, value, field)` is the one way from a string in a request (an
identity, a job, an asset; a path parameter or a body field) to the object: it looks the id
up with the tenant in the query, and hands back a handle that carries the object's row and
the folders the service keeps it in. What runs below the service (the store's items, the
flows) gets paths taken from handles, never the string the request held. Anything else (an
id of another tenant, an id that never existed, a path, a name) is `NotFound` with the same
words, naming the field, so an answer tells nothing about other tenants or the disk.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from portrait.core.errors import PortraitError

from .tenants import AssetRow, IdentityRow, JobRow, TenantDB

_ID = re.compile(r"^[a-z][0-9a-f]{16}$")  # tenants.new_id: a letter and 16 hex digits


class NotFound(PortraitError):
    """No such object for this tenant (HTTP 404). `field`: where the request named it."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class IdentityHandle:
    tenant: str
    id: str
    row: IdentityRow
    folder: Path  # ROOT/identities/<id>: uploads/ and prepare/
    bundle: Path  # HOME/identities/<id>: what training writes


@dataclass(frozen=True)
class JobHandle:
    tenant: str
    id: str
    row: JobRow
    outputs: Path  # ROOT/jobs/<id>


@dataclass(frozen=True)
class AssetHandle:
    tenant: str
    id: str
    row: AssetRow
    folder: Path  # ROOT/assets/<id>: the image and, for use as a photo template, template.yaml

    @property
    def path(self) -> Path:
        return self.folder / self.row.file


_PREFIX = {"identity": "i", "job": "j", "asset": "a"}


class Scope:
    def __init__(self, db: TenantDB, root: Path, identities_dir: Path):
        self.db, self.root, self.identities_dir = db, Path(root), Path(identities_dir)

    def resolve(self, tenant: str, kind: str, value: Any, field: str | None = None):
        """The handle of the tenant's `kind` object named `value`, or NotFound naming `field`."""
        shaped = isinstance(value, str) and bool(_ID.match(value))
        # Only an id-shaped value is echoed: a path or a name is never repeated back.
        shown = f"{kind} '{value}'" if shaped else f"{kind} (not an id of yours)"
        missing = NotFound(f"{shown} not found" + (f" ({field})" if field else ""), field)
        if not shaped or value[0] != _PREFIX[kind]:
            raise missing
        if kind == "identity":
            row = self.db.identity(tenant, value)
            if row is None:
                raise missing
            return IdentityHandle(tenant, value, row, self.root / "identities" / value, self.identities_dir / value)
        if kind == "job":
            job = self.db.job(tenant, value)
            if job is None:
                raise missing
            return JobHandle(tenant, value, job, self.root / "jobs" / value)
        asset = self.db.asset(tenant, value)
        if asset is None:
            raise missing
        return AssetHandle(tenant, value, asset, self.root / "assets" / value)

    def identity(self, tenant: str, value: Any, field: str | None = None) -> IdentityHandle:
        return self.resolve(tenant, "identity", value, field)

    def job(self, tenant: str, value: Any, field: str | None = None) -> JobHandle:
        return self.resolve(tenant, "job", value, field)

    def asset(self, tenant: str, value: Any, field: str | None = None) -> AssetHandle:
        return self.resolve(tenant, "asset", value, field)

    def handle_of(self, row: IdentityRow) -> IdentityHandle:
        return IdentityHandle(row.tenant, row.id, row, self.root / "identities" / row.id, self.identities_dir / row.id)
