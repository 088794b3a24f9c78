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
    lora*.safetensors    per base family (diffusers' layout, and the family's A1111/ComfyUI layout)
    curve.png            the likeness / CLIP-T curve of training (steps vs validation figures)

A bundle without "loras" is a zero-shot identity (`portrait train --zero-shot`).

`write_bundle` is the one writer (the train flow and the tests' helpers use it) and
`load_identity` / `read_manifest` the readers; `update_manifest` adds facts known only after
the files are in place (the copy-paste yardstick, the bill of materials).
"""

from __future__ import annotations

import json
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from .config import Settings
from .errors import BadInput
from .formats.lora import TEXT_TARGETS, UNET_TARGETS, save_diffusers_lora, save_kohya_lora
from .io import atomic_path, copy_file, write_image, write_json
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
    return identity_from_manifest(root, read_manifest(root))


def load_bundle(root: Path) -> Identity:
    """The identity in bundle folder `root` (a caller that resolved the folder itself: the
    service, from an identity it looked up in the tenant's own scope)."""
    root = Path(root)
    if not (root / "manifest.json").is_file():
        raise BadInput(f"identity '{root.name}' is not trained (no bundle)")
    return identity_from_manifest(root, read_manifest(root))


def read_manifest(root: Path) -> dict[str, Any]:
    """A bundle's manifest.json; an unreadable one is one line naming it (exit 2)."""
    manifest_path = Path(root) / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BadInput(f"{manifest_path}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict):
        raise BadInput(f"{manifest_path}: unreadable manifest (not a JSON object)")
    return manifest


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
    """A bundle's embeddings.npz; a damaged one is one line naming it (exit 2), as the LoRA is."""
    if not path.is_file():
        return {}
    try:
        with np.load(path) as data:
            return {key: data[key].astype(np.float32) for key in data.files}
    except (ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise BadInput(f"{path}: damaged embeddings file ({exc.__class__.__name__}); retrain or re-prepare the "
                       f"identity") from None


def write_embeddings(path: Path, embeddings: dict[str, np.ndarray]) -> None:
    with atomic_path(path, suffix=".tmp.npz") as tmp:
        np.savez(tmp, **{k: np.asarray(v, dtype=np.float32) for k, v in embeddings.items()})


def write_manifest(root: Path, manifest: dict[str, Any]) -> Path:
    manifest = {"format": BUNDLE_FORMAT, **manifest}
    return write_json(root / "manifest.json", manifest)


def update_manifest(root: Path, **fields: Any) -> Path:
    """Add or replace top-level manifest fields (atomically: the whole file is rewritten)."""
    manifest = read_manifest(root)
    manifest.update(fields)
    return write_json(Path(root) / "manifest.json", manifest)


@dataclass(frozen=True)
class BundleLora:
    """One trained LoRA for a bundle: per-component peft state dicts (`unet`, `text_encoder`, ...)."""

    family: str  # sd15 | sdxl | flux | flux2-klein | zimage
    state: Mapping[str, Mapping[str, Any]]
    rank: int
    alpha: float
    base_model: str = ""
    unet_targets: Sequence[str] = UNET_TARGETS
    text_targets: Sequence[str] = TEXT_TARGETS
    transformer_targets: Sequence[str] = ()  # flow-matching families: the transformer modules (default: the family's)
    kohya_metadata: Mapping[str, str] | None = None  # None: no A1111/ComfyUI copy
    row: Mapping[str, Any] = field(default_factory=dict)  # more facts for manifest["loras"][family]


def write_bundle(root: Path, manifest: Mapping[str, Any], *, reference: Path | np.ndarray,
                 photos: Sequence[Path | np.ndarray] = (), embeddings: Mapping[str, np.ndarray] | None = None,
                 report: Mapping[str, Any] | None = None, lora: BundleLora | None = None) -> Path:
    """Write a whole bundle into `root` (a staging folder the caller publishes, or a test's
    identity folder): the reference and the top-k photos (files to copy or RGB arrays), the
    embeddings, prepare's report, the LoRA files, and manifest.json naming them all.

    `manifest` holds the identity's facts (name, trigger, class_word, preset, ...); the file
    keys (`reference`, `photos`, `embeddings`, `loras`) are filled in here.
    """
    root = Path(root)
    files: dict[str, Any] = {"reference": "reference.png"}
    if isinstance(reference, np.ndarray):
        write_image(root / "reference.png", reference)
    else:
        copy_file(reference, root / "reference.png")
    rels = []
    for i, source in enumerate(photos):
        if isinstance(source, np.ndarray):
            rel = f"photos/{i:03d}.png"
            write_image(root / rel, source)
        else:
            rel = f"photos/{i:03d}{Path(source).suffix.lower() or '.png'}"
            copy_file(source, root / rel)
        rels.append(rel)
    files["photos"] = rels
    if embeddings is not None:
        write_embeddings(root / "embeddings.npz", dict(embeddings))
        files["embeddings"] = "embeddings.npz"
    if report is not None:
        write_json(root / "report.json", dict(report))
    tail: dict[str, Any] = {}
    if lora is not None:
        save_diffusers_lora(root / "lora.safetensors", lora.family, lora.state, lora.rank, lora.alpha,
                            lora.unet_targets, lora.text_targets, tuple(lora.transformer_targets) or None)
        row: dict[str, Any] = {"file": "lora.safetensors"}
        if lora.kohya_metadata is not None:
            save_kohya_lora(root / "lora_kohya.safetensors", lora.family, lora.state, lora.alpha, lora.kohya_metadata)
            row["kohya"] = "lora_kohya.safetensors"
        row.update({"base_model": lora.base_model, **dict(lora.row), "rank": lora.rank, "alpha": lora.alpha})
        tail["loras"] = {lora.family: row}
    head = {k: v for k, v in manifest.items() if k in ("name", "trigger", "class_word", "preset", "created")}
    rest = {k: v for k, v in manifest.items() if k not in head}
    return write_manifest(root, {**head, **files, **rest, **tail})
