"""Identity bundles on disk: HOME/identities/NAME/.

Layout (manifest.json is the source of truth; other files are named by it):

    manifest.json        {"format": 1, "name", "trigger", "class_word", "preset", "created",
                          "reference": "reference.png", "photos": ["photos/000.png", ...],
                          "embeddings": "embeddings.npz",
                          "loras": {"sd15": {"file": "lora.safetensors",
                                             "kohya": "lora_kohya.safetensors",
                                             "base_model": ID, "rank": R, "alpha": A}},
                          "versions": {...}, "train": {...}, "validation": [...], "timings": {...}}
    reference.png        the face used for fusion
    photos/NNN.png       the top-k photos, for zero-shot embeddings with any face backend
    embeddings.npz       "<backend>" -> normalized consensus embedding
    report.json          prepare's report
    lora*.safetensors    per base family

A bundle without "loras" is a zero-shot identity (`portrait train --zero-shot`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from .config import Settings
from .errors import BadInput
from .io import atomic_path, write_json
from .types import Identity, LoraFile

BUNDLE_FORMAT = 1
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_name(name: str) -> str:
    if not _NAME.match(name or ""):
        raise BadInput(
            f"identity name '{name}': use 1-64 letters, digits, '_', '-' or '.', starting with a letter or digit"
        )
    return name


def identity_dir(settings: Settings, name: str) -> Path:
    return settings.identities_dir / check_name(name)


def list_identities(settings: Settings) -> list[str]:
    root = settings.identities_dir
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "manifest.json").is_file())


def load_identity(settings: Settings, name: str) -> Identity:
    root = identity_dir(settings, name)
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        known = ", ".join(list_identities(settings)) or "none yet; run `portrait train`"
        raise BadInput(f"identity '{name}' does not exist in {settings.identities_dir} (known: {known})")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BadInput(f"{manifest_path}: unreadable manifest ({exc})") from None
    return identity_from_manifest(root, manifest)


def identity_from_manifest(root: Path, manifest: dict[str, Any]) -> Identity:
    loras = {
        family: LoraFile(
            family=family,
            path=root / row["file"],
            kohya_path=root / row["kohya"] if row.get("kohya") else None,
            base_model=row.get("base_model", ""),
            rank=int(row.get("rank", 0)),
            alpha=float(row.get("alpha", 0)),
        )
        for family, row in (manifest.get("loras") or {}).items()
    }
    return Identity(
        name=manifest["name"],
        root=root,
        trigger=manifest.get("trigger", ""),
        class_word=manifest.get("class_word", "person"),
        reference=root / manifest.get("reference", "reference.png"),
        photos=tuple(root / p for p in manifest.get("photos", [])),
        consensus=read_embeddings(root / manifest.get("embeddings", "embeddings.npz")),
        loras=loras,
        manifest=manifest,
    )


def read_embeddings(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        return {}
    with np.load(path) as data:
        return {key: data[key].astype(np.float32) for key in data.files}


def write_embeddings(path: Path, embeddings: dict[str, np.ndarray]) -> None:
    with atomic_path(path, suffix=".tmp.npz") as tmp:
        np.savez(tmp, **{k: np.asarray(v, dtype=np.float32) for k, v in embeddings.items()})


def write_manifest(root: Path, manifest: dict[str, Any]) -> Path:
    manifest = {"format": BUNDLE_FORMAT, **manifest}
    return write_json(root / "manifest.json", manifest)
