"""What a registry row is and where a resolved model lies: the values every model reader shares.

They sit below the registry (portrait/core/registry.py reads models.yaml into them), the
license policy (portrait/core/licenses.py judges them) and the stand-in writers
(portrait/core/tiny/), so none of those imports another to name them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

NON_COMMERCIAL = "non-commercial"


class ModelSpec(BaseModel):
    """One registry entry. `files` are paths relative to the repo (or archive, or package)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    kind: str
    family: str | None = None
    source: str = "hf"  # hf | url | package | tiny
    repo: str | None = None
    revision: str | None = None
    files: list[str] = Field(default_factory=list)
    url: str | None = None  # for source=url: the base URL the files (or the archive) come from
    archive: str | None = None  # for source=url: a zip whose members are `files`
    strip: str | None = None  # folder inside the archive to strip when extracting
    package: str | None = None  # for source=package: the import name that ships `files`
    license: str = "unknown"
    commercial: bool = True
    size: int | None = None  # bytes, all files
    sizes: dict[str, int] = Field(default_factory=dict)  # file -> exact bytes (the memory plan sizes absent files by them)
    sha256: dict[str, str] = Field(default_factory=dict)  # file -> hash where known
    dtype: str | None = None  # what the weight files store (bf16 | fp16 | fp32; `.fp16.` names say fp16 themselves)
    gated: bool = False  # the hub asks the user to accept a license and log in before downloading
    pickle: bool = False  # needs torch.load(weights_only=True) after the hash check
    tiny: str | None = None  # id of the make-tiny stand-in
    config: str | None = None  # shipped config folder (presets/configs/...) for single-file bases
    maker: str | None = None  # for source=tiny: "module:function" that writes it (make-tiny)
    notes: str = ""
    # from presets/licenses.yaml (portrait.core.licenses)
    license_class: str = "unknown"  # commercial | non-commercial | research | unknown
    license_source: str = ""
    alternative: str | None = None  # what to use instead when a policy refuses it

    @property
    def license_label(self) -> str:
        return self.license if self.commercial else f"{self.license} ({NON_COMMERCIAL})"


@dataclass(frozen=True)
class ResolvedModel:
    spec: ModelSpec
    root: Path  # folder holding `spec.files` at their relative paths
    origin: str  # explicit | home | hf-cache | package | tiny
    files: tuple[str, ...] = field(default=())

    @property
    def path(self) -> Path:
        """The model's main path: its only file, or its folder."""
        if len(self.files) == 1 and not self.files[0].endswith("/"):
            return self.root / self.files[0]
        return self.root

    def file(self, name: str) -> Path:
        return self.root / name
