"""Limits and settings of the service, read from a preset's `service` section.

Uploads come from the network, so the limits are tighter than the CLI's (which trusts the
files on the user's own disk): a portrait session needs 5-20 photos of a few MB each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, ClassVar

from pydantic import Field

from portrait.core.declare import from_preset

Positive = Annotated[int, Field(ge=1)]


@dataclass(frozen=True)
class ServicePolicy:
    """The preset's `service` section (the declaration: type, default, bounds)."""

    SECTION: ClassVar[str] = "service"

    max_file_bytes: Positive = 25_000_000  # one photo (or one zip member), as stored
    max_files: Positive = 60  # photos per identity, after zips are expanded
    max_pixels: Positive = 50_000_000  # per photo, read from the header before decoding
    max_request_bytes: Positive = 300_000_000  # the whole multipart body
    max_zip_ratio: Annotated[float, Field(gt=1)] = 200.0  # uncompressed / compressed size above which a member is a bomb
    max_zip_members: Positive = 1000  # entries in one archive, directories included
    max_prompt_chars: Positive = 2000
    max_count: Positive = 64  # images per generation job
    progress_every: Annotated[float, Field(gt=0)] = 0.25  # seconds between progress writes of a running item

    @classmethod
    def from_preset(cls, preset) -> "ServicePolicy":
        return from_preset(cls, preset)

    @property
    def max_expanded_bytes(self) -> int:
        """Everything one upload may expand to."""
        return self.max_files * self.max_file_bytes
