"""make-tiny: deterministic tiny models in the real on-disk formats.

Each tiny stand-in is a row in presets/models.yaml with `source: tiny` and a `maker`
("module:function"). A maker is `write(root: Path, seed: int) -> None` and must write
byte-identical files for the same seed. `write_tiny` writes one into a temp folder and
renames it into HOME/models/<id>/, so a crash never leaves a half-made model
(`portrait.core.registry.make_tiny` writes them all; this package names no registry, so the
registry can write a stand-in on first use without an import cycle).

Each folder carries a `.tiny-version` stamp: when the stand-ins' shapes change (bump
TINY_VERSION), an existing HOME gets fresh ones instead of loading stale sizes.
"""

from __future__ import annotations

import importlib
import sys
import zlib
from pathlib import Path
from typing import Callable, Iterable

from ..config import Settings
from ..errors import PortraitError
from ..integrity import record_hashes
from ..io import atomic_dir
from ..modelspec import ModelSpec

TINY_VERSION = "3"  # 2: SD VAEs downsample by 8, as the real ones do; 3: SD1.5 ControlNets are single files
STAMP = ".tiny-version"


def maker_for(spec: ModelSpec) -> Callable[[Path, int], None]:
    if not spec.maker or ":" not in spec.maker:
        raise PortraitError(f"models.yaml: tiny model '{spec.id}' has no maker")
    module_name, func_name = spec.maker.split(":", 1)
    return getattr(importlib.import_module(module_name), func_name)


def seed_for(model_id: str, seed: int) -> int:
    """A per-model seed, so adding a model never changes the bytes of another."""
    return (zlib.crc32(model_id.encode()) + seed) % (2**31)


def tiny_specs(specs: Iterable[ModelSpec]) -> list[ModelSpec]:
    return [s for s in specs if s.source == "tiny"]


def write_tiny(spec: ModelSpec, target: Path, seed: int = 0) -> Path:
    """Write one stand-in into `target` atomically, stamped and with its files' hashes recorded
    (`portrait.core.registry.make_tiny` writes them all)."""
    with atomic_dir(target) as tmp:
        maker_for(spec)(tmp, seed_for(spec.id, seed))
        (tmp / STAMP).write_text(TINY_VERSION)
        record_hashes(tmp)  # so `models verify` and loading find a changed byte in a stand-in too
    return target


_announced: set[Path] = set()


def write_stand_in(spec: ModelSpec, settings: Settings) -> Path:
    """Write one stand-in on first use (the registry calls this when a tiny preset resolves a
    missing or stale one), saying so once per models folder and process on stderr."""
    models_dir = settings.models_dir
    if models_dir not in _announced:
        _announced.add(models_dir)
        print(f"tiny preset: writing offline stand-in models to {models_dir} on first use (about a second each)",
              file=sys.stderr)
    target = models_dir / spec.id
    try:
        return write_tiny(spec, target)
    except OSError:
        # Another process (a second batch worker) wrote it at the same moment: its copy is
        # byte-identical, so take it when it is complete.
        if is_current(target):
            return target
        raise


def is_current(target: Path) -> bool:
    stamp = target / STAMP
    return stamp.is_file() and stamp.read_text().strip() == TINY_VERSION
