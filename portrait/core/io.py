"""Atomic output writing, bounded input reading and image metadata.

Every file we write goes to a temp name in the same folder, is flushed and fsynced, checked
(not empty), and only then renamed into place; the folder is fsynced after the rename. So a
crash or a full disk never leaves a half-written file under a final name, and a reader never
sees one. A write the machine refuses (no space, read-only, permission) becomes one
`OutputFailed` line naming the path (exit 4); the temp file is removed.

Folders of results (prepare's OUT, generate's OUT, a bundle) are built in a staging folder
beside the target and swapped in with `publish_dir`, so re-running into an old folder replaces
it as a unit: never a mix of old and new files.

Inputs are read with `read_input`: regular files only (a FIFO, a device or /dev/zero is refused
by type, before it is opened for reading), and never more than the limit, whatever `stat` says.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .errors import ENVIRONMENT_ERRNOS, OutputFailed, bad_file, output_failed


@contextlib.contextmanager
def atomic_path(target: Path | str, suffix: str | None = None, size: int | None = None) -> Iterator[Path]:
    """Yield a temp path beside `target`; when the block succeeds the file is fsynced, checked
    (it exists; it holds `size` bytes when that is known) and renamed onto `target`.
    Refused writes raise OutputFailed(target)."""
    target = Path(target)
    make_dirs(target.parent)
    try:
        fd, tmp = tempfile.mkstemp(
            prefix=f".{target.name}.", suffix=suffix if suffix is not None else target.suffix + ".tmp",
            dir=target.parent)
        os.close(fd)
    except OSError as exc:
        raise _refused(target.parent, exc)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        finish_file(tmp_path, target, size)
    except OSError as exc:
        raise _refused(target, exc)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def finish_file(tmp_path: Path, target: Path, size: int | None = None) -> None:
    """fsync, check and rename one finished temp file onto `target`, then fsync the folder."""
    with open(tmp_path, "rb+") as fh:
        os.fsync(fh.fileno())
        written = os.fstat(fh.fileno()).st_size
    if size is not None and written != size:
        raise OSError(errno.EIO, f"wrote {written} of {size} bytes", str(target))
    # mkstemp makes 0600 files; outputs get the permissions a plain open() would give
    os.chmod(tmp_path, 0o666 & ~_umask())
    os.replace(tmp_path, target)
    fsync_dir(target.parent)


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (best effort: some filesystems refuse a dir fsync)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _refused(path: Path, exc: OSError) -> Exception:
    """An OSError while writing: the environment's refusal (exit 4) or, if not one, itself."""
    if exc.errno in ENVIRONMENT_ERRNOS:
        return output_failed(path, exc)
    return exc


def make_dirs(folder: Path) -> Path:
    """mkdir -p, with a refusal as one line naming the folder (exit 4), and a file in the way as
    bad input (exit 2)."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise bad_file(folder, "exists and is not a folder") from None
    except NotADirectoryError:
        raise bad_file(folder, "a part of this path is a file, not a folder") from None
    except OSError as exc:
        raise _refused(folder, exc) from None
    return folder


@contextlib.contextmanager
def atomic_dir(target: Path | str) -> Iterator[Path]:
    """Yield a temp folder beside `target`; it replaces `target` only if the block succeeds."""
    import shutil

    target = Path(target)
    make_dirs(target.parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    except OSError as exc:
        raise _refused(target.parent, exc) from None
    try:
        yield tmp
        sync_tree(tmp)
        publish_dir(tmp, target)
    except OSError as exc:
        raise _refused(target, exc) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def sync_tree(folder: Path) -> None:
    """fsync every file under `folder` (files written by libraries that do not fsync)."""
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(Path(folder))


def check_replaceable(target: Path | str, flag: str = "--out") -> Path:
    """A folder we will replace whole must not be the current folder or one that holds it."""
    resolved = Path(target).expanduser().resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents or resolved == Path(resolved.anchor):
        raise bad_file(target, f"{flag} cannot be the current folder or one of its parents (it is replaced whole)")
    return resolved


def staging_for(target: Path | str) -> Path:
    """A fresh staging folder beside `target` (same filesystem, so publishing is a rename)."""
    target = Path(target).resolve()
    make_dirs(target.parent)
    try:
        return Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=target.parent))
    except OSError as exc:
        raise _refused(target.parent, exc) from None


def publish_dir(staging: Path, target: Path) -> None:
    """Replace `target` with the finished `staging` folder by renames (the old one goes last), so
    `target` is always either the whole old result or the whole new one."""
    import shutil

    staging, target = Path(staging), Path(target).resolve()
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if old.exists():
        shutil.rmtree(old)
    try:
        if target.exists():
            os.replace(target, old)
        os.replace(staging, target)
    except OSError as exc:
        if old.exists() and not target.exists():
            os.replace(old, target)
        raise _refused(target, exc) from None
    fsync_dir(target.parent)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


def as_published(exc: OutputFailed, staging: Path, target: Path) -> OutputFailed:
    """A refusal while writing into a staging folder, worded with the path the user asked for
    (`OUT/contact_sheet.png: no space left on device`, not the hidden staging name)."""
    return OutputFailed(str(exc).replace(str(staging), str(target)))


def discard_dir(folder: Path | None) -> None:
    """Remove a staging folder (best effort; used on the way out of a failed run)."""
    import shutil

    if folder is not None and Path(folder).exists():
        shutil.rmtree(folder, ignore_errors=True)


def read_input(path: Path | str, limit: int, what: str = "file") -> bytes:
    """The bytes of a user's regular file, at most `limit` of them.

    A FIFO, socket or device is refused by type before it is opened for reading (opening a FIFO
    would block; /dev/zero never ends). The file is opened non-blocking and checked again on the
    open descriptor, and the read stops at limit + 1 bytes, so a file that grows, or a `stat`
    that lies (/proc, FUSE), cannot make us read without end.
    """
    path = Path(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise bad_file(path, "no such file") from None
    except PermissionError:
        raise bad_file(path, "permission denied (cannot read it)") from None
    except OSError as exc:
        raise bad_file(path, f"cannot read it ({(exc.strerror or str(exc)).lower()})") from None
    kind = special_kind(info.st_mode)
    if kind:
        raise bad_file(path, f"is a {kind}, not a regular {what}")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except PermissionError:
        raise bad_file(path, "permission denied (cannot read it)") from None
    except OSError as exc:
        raise bad_file(path, f"cannot read it ({(exc.strerror or str(exc)).lower()})") from None
    with os.fdopen(fd, "rb") as fh:
        kind = special_kind(os.fstat(fh.fileno()).st_mode)
        if kind:
            raise bad_file(path, f"is a {kind}, not a regular {what}")
        try:
            data = read_bounded(fh, limit)
        except OSError as exc:
            raise bad_file(path, f"cannot read it ({(exc.strerror or str(exc)).lower()})") from None
    if len(data) > limit:
        raise bad_file(path, f"is over the {limit:,} byte limit")
    return data


def read_bounded(fh, limit: int, chunk: int = 1 << 20) -> bytes:
    """At most limit + 1 bytes from a binary stream, in chunks (a single read(limit + 1) would
    allocate the whole limit up front)."""
    parts, total = [], 0
    while total <= limit:
        block = fh.read(min(chunk, limit + 1 - total))
        if not block:
            break
        parts.append(block)
        total += len(block)
    return b"".join(parts)


def special_kind(mode: int) -> str | None:
    """'FIFO', 'device', 'socket' for a non-regular, non-folder file mode; None otherwise."""
    import stat as s

    if s.S_ISFIFO(mode):
        return "FIFO (named pipe)"
    if s.S_ISCHR(mode) or s.S_ISBLK(mode):
        return "device"
    if s.S_ISSOCK(mode):
        return "socket"
    if not (s.S_ISREG(mode) or s.S_ISDIR(mode)):
        return "special file"
    return None


def copy_file(source: Path | str, target: Path | str, limit: int = 1 << 40) -> Path:
    """Copy a file atomically (read whole, write temp, fsync, rename): prepare's copies of photos."""
    data = read_input(source, limit)
    return write_bytes(target, data)


@functools.cache
def _umask() -> int:
    """The process umask, read once: reading it means setting it, which is not thread-safe."""
    current = os.umask(0)
    os.umask(current)
    return current


def write_bytes(target: Path | str, data: bytes) -> Path:
    with atomic_path(target, size=len(data)) as tmp:
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
