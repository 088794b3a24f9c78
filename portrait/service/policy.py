"""Limits and settings of the service, read from a preset's `service` section.

Uploads come from the network, so the limits are tighter than the CLI's (which trusts the
files on the user's own disk): a portrait session needs 5-20 photos of a few MB each.

What one tenant may use (queue, jobs, images a day, stored bytes) and how long its files are
kept is `TenantPolicy`, declared once here: the preset's `service.tenant` section sets the
defaults for every tenant, and `portrait serve tenant set NAME KEY=VALUE` overrides a key for
one tenant (stored in the service database, checked against this same declaration).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal, Mapping

from pydantic import Field

from portrait.core.declare import from_preset, validate

Positive = Annotated[int, Field(ge=1)]
Days = Annotated[float, Field(gt=0)]


@dataclass(frozen=True)
class TenantPolicy:
    """One tenant's quotas and retention (the preset's `service.tenant` section: the defaults)."""

    SECTION: ClassVar[str] = "service.tenant"

    max_queued_items: Positive = 500  # items queued or running at once (a 64-image job is 64 items)
    max_active_jobs: Positive = 20  # jobs queued or running at once
    max_running_items: Positive | None = None  # workers one tenant may hold at once (none: as many as are free)
    max_images_per_day: Positive = 2000  # images submitted per UTC day (retries count again)
    max_stored_bytes: Positive = 20_000_000_000  # uploads, identities, assets and results together
    photos_days: Days | None = None  # days after upload to erase the photos and all cut from them (crops, embeddings, LoRA)
    outputs_days: Days | None = None  # days after they were made to erase results (images, their jobs)

    def with_overrides(self, values: Mapping[str, Any], where: str) -> "TenantPolicy":
        """These defaults with one tenant's stored overrides (checked against the declaration)."""
        return validate(TenantPolicy, {**dataclasses.asdict(self), **values}, where)

    @staticmethod
    def keys() -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(TenantPolicy))


@dataclass(frozen=True)
class ServicePolicy:
    """The preset's `service` section (the declaration: type, default, bounds)."""

    SECTION: ClassVar[str] = "service"

    # `portrait serve --auth` wins over this key.
    auth: Literal["tokens", "none"] = "tokens"  # tokens: each request's token names its tenant (no tokens: nobody gets in); none: one local tenant, loopback only
    max_file_bytes: Positive = 25_000_000  # one photo (or one zip member), as stored
    max_files: Positive = 60  # photos per identity, after zips are expanded
    max_pixels: Positive = 50_000_000  # per photo, read from the header before decoding
    max_request_bytes: Positive = 300_000_000  # the whole multipart body
    max_zip_ratio: Annotated[float, Field(gt=1)] = 200.0  # uncompressed / compressed size above which a member is a bomb
    max_zip_members: Positive = 1000  # entries in one archive, directories included
    max_prompt_chars: Positive = 2000
    max_count: Positive = 64  # images per generation job
    upload_workers: Positive = 2  # photo checks running at once (each keeps its own face models warm)
    progress_every: Annotated[float, Field(gt=0)] = 0.25  # seconds between progress writes of a running item
    sweep_seconds: Annotated[float, Field(gt=0)] = 3600.0  # how often the retention sweeper runs
    tenant: TenantPolicy = field(default_factory=TenantPolicy)

    @classmethod
    def from_preset(cls, preset) -> "ServicePolicy":
        return from_preset(cls, preset)

    @property
    def max_expanded_bytes(self) -> int:
        """Everything one upload may expand to."""
        return self.max_files * self.max_file_bytes
