"""Model integrity: every file of a model checked against a known sha256, on demand
(`portrait models verify`) and when the model is loaded.

Where a hash comes from: the registry (presets/models.yaml `sha256:`), else the record a
model folder carries (`.portrait-sha256.json`), written when portrait itself wrote the files
(`portrait models make-tiny`, `portrait models download`). So a changed byte in any model,
tiny stand-ins included, is found.

Loading checks each hashed file once per (size, mtime): the verified stamps live in
HOME/cache/verified.json, so a warm run re-hashes nothing (hashing a 4 GB base takes ~15 s)
and a file that changes (new mtime or size) is hashed again before it is used.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, Iterable

from .errors import ModelMissing

RECORD = ".portrait-sha256.json"
_lock = threading.Lock()
_memory: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256, this process


class ModelCorrupt(ModelMissing):
    """A model file does not match its recorded sha256 (exit 3, like a missing model: the
    fix is to fetch or rebuild it)."""

    def __init__(self, model_id: str, file: str, command: str):
        self.model_id = model_id
        self.command = command
        Exception.__init__(self, f"model '{model_id}': {file} does not match its recorded sha256 (changed or "
                                 f"corrupt); run `{command}`")


def record_hashes(root: Path, files: Iterable[str] | None = None) -> dict[str, str]:
    """Hash every file under `root` (or `files`) and write the record beside them."""
    from .io import sha256_file, write_json

    root = Path(root)
    names = sorted(files) if files is not None else sorted(
        p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    hashes = {name: sha256_file(root / name) for name in names if (root / name).is_file()}
    write_json(root / RECORD, {"sha256": hashes})
    return hashes


def recorded_hashes(root: Path) -> dict[str, str]:
    path = Path(root) / RECORD
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        return {str(k): str(v) for k, v in (data.get("sha256") or {}).items()}
    except (OSError, ValueError, AttributeError):
        return {}


def expected_hashes(spec: Any, root: Path) -> dict[str, str]:
    """Registry hashes win; the folder's record fills in the rest."""
    return {**recorded_hashes(root), **dict(getattr(spec, "sha256", {}) or {})}


def fix_command(spec: Any) -> str:
    return "portrait models make-tiny --force" if spec.source == "tiny" else f"portrait models download {spec.id}"


def check_model(spec: Any, root: Path, home: Path | None) -> None:
    """Raise ModelCorrupt if any hashed file of a resolved model differs from its hash."""
    from .io import sha256_file

    expected = expected_hashes(spec, root)
    if not expected and spec.source == "tiny" and Path(root).is_dir():
        # A stand-in written before hashes were recorded: record what is there now, so from
        # here on a changed byte is found (make-tiny --force rewrites it from scratch).
        try:
            expected = record_hashes(root)
        except Exception:  # noqa: BLE001 - a read-only models folder: nothing to check against
            return
    if not expected:
        return
    stamps = _load_stamps(home)
    changed = False
    for name, digest in sorted(expected.items()):
        path = Path(root) / name
        try:
            st = path.stat()
        except OSError:
            continue  # a missing file is the resolver's business (ModelMissing)
        if _import_record(root, name) is not None:
            continue  # converted by `models import-ncnn`: its loader checks the import's own hash
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        if _memory.get(key) == digest or stamps.get(_stamp_key(key)) == digest:
            _memory[key] = digest
            continue
        actual = sha256_file(path)
        if actual != digest:
            raise ModelCorrupt(spec.id, name, fix_command(spec))
        _memory[key] = digest
        stamps[_stamp_key(key)] = digest
        changed = True
    if changed:
        _save_stamps(home, stamps)


def file_sha256(path: Path, home: Path | None) -> str:
    """The sha256 of a file, computed once per (path, size, mtime): from this process's memory,
    else HOME/cache/verified.json, else hashed now and remembered in both. The train flow's bill
    of materials and base-model record hash a 4 GB base through here; re-hashing it at the end
    of every run cost ~6 s after the last step (issue 28)."""
    from .io import sha256_file

    st = Path(path).stat()
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    known = _memory.get(key) or _load_stamps(home).get(_stamp_key(key))
    if known:
        _memory[key] = known
        return known
    digest = sha256_file(path)
    _memory[key] = digest
    _save_stamps(home, {_stamp_key(key): digest})
    return digest


def _import_record(root: Path, name: str) -> str | None:
    try:
        from .ncnn import imported_hash

        return imported_hash(root, name)
    except Exception:  # noqa: BLE001 - an unreadable record: the ncnn loader reports it
        return "unreadable"


def _stamp_key(key: tuple[str, int, int]) -> str:
    return f"{key[0]}|{key[1]}|{key[2]}"


def _stamps_path(home: Path | None) -> Path | None:
    return Path(home) / "cache" / "verified.json" if home is not None else None


def _load_stamps(home: Path | None) -> dict[str, str]:
    path = _stamps_path(home)
    if path is None or not path.is_file():
        return {}
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return {}


def _save_stamps(home: Path | None, stamps: dict[str, str]) -> None:
    """Best effort: a read-only home only costs a re-hash next time."""
    from .io import write_json

    path = _stamps_path(home)
    if path is None:
        return
    with _lock:
        try:
            write_json(path, {**_load_stamps(home), **stamps})
        except Exception:  # noqa: BLE001
            pass
