"""Limits and settings of the service, read from a preset's `service` section.

Uploads come from the network, so the limits are tighter than the CLI's (which trusts the
files on the user's own disk): a portrait session needs 5-20 photos of a few MB each.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class ServicePolicy:
    max_file_bytes: int = 25_000_000  # one photo (or one zip member), as stored
    max_files: int = 60  # photos per identity, after zips are expanded
    max_pixels: int = 50_000_000  # per photo, read from the header before decoding
    max_request_bytes: int = 300_000_000  # the whole multipart body
    max_zip_ratio: float = 200.0  # uncompressed / compressed size above which a member is a bomb
    max_zip_members: int = 1000  # entries in one archive, directories included
    max_prompt_chars: int = 2000
    max_count: int = 64  # images per generation job
    progress_every: float = 0.25  # seconds between progress writes of a running item

    @classmethod
    def from_section(cls, section: dict[str, Any] | None) -> "ServicePolicy":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in (section or {}).items() if k in known and v is not None})

    @property
    def max_expanded_bytes(self) -> int:
        """Everything one upload may expand to."""
        return self.max_files * self.max_file_bytes
