"""Atomic output writing and image metadata.

Every file we write goes to a temp name in the same folder and is renamed into place,
so a crash never leaves a half-written output and a reader never sees one.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np


@contextlib.contextmanager
def atomic_path(target: Path | str, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temp path beside `target`; rename it onto `target` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=suffix if suffix is not None else target.suffix + ".tmp", dir=target.parent
    )
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes 0600 files; outputs get the permissions a plain open() would give
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(target: Path | str) -> Iterator[Path]:
    """Yield a temp folder beside `target`; it replaces `target` only if the block succeeds."""
    import shutil

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


@functools.cache
def _umask() -> int:
    """The process umask, read once: reading it means setting it, which is not thread-safe."""
    current = os.umask(0)
    os.umask(current)
    return current


def write_bytes(target: Path | str, data: bytes) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def write_text(target: Path | str, text: str) -> Path:
    return write_bytes(target, text.encode("utf-8"))


def write_json(target: Path | str, data: Any) -> Path:
    return write_text(target, json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def write_image(target: Path | str, image: np.ndarray, text: dict[str, str] | None = None) -> Path:
    """Write an RGB uint8 array as PNG (with tEXt/iTXt chunks) or JPEG/WebP by suffix."""
    from PIL import Image, PngImagePlugin

    target = Path(target)
    pil = Image.fromarray(np.ascontiguousarray(image))
    with atomic_path(target) as tmp:
        if target.suffix.lower() == ".png":
            info = PngImagePlugin.PngInfo()
            for key, value in (text or {}).items():
                info.add_itxt(key, value) if not value.isascii() else info.add_text(key, value)
            pil.save(tmp, format="PNG", pnginfo=info)
        else:
            pil.save(tmp, format=Image.registered_extensions().get(target.suffix.lower(), "PNG"), quality=95)
    return target


def read_png_text(path: Path | str) -> dict[str, str]:
    from PIL import Image

    with Image.open(path) as im:
        return dict(getattr(im, "text", {}) or {})


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def safetensors_data_sha256(path: Path | str) -> str:
    """A1111's LoRA hash input: the sha256 of a safetensors file after its header."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
        fh.seek(8 + header_len)
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
