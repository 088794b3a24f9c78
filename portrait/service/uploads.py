"""Screening uploaded photos before anything is written: size, count, pixels, content, zips.

What a file is comes from its bytes (PIL reads the header; a zip is recognised by its
signature), never from its name or the client's content type. A name is only a label for the
report: stored files are named `NNN.<ext>` by their position, so no upload name, and no name
inside a zip, ever becomes part of a path.

Each bad file becomes a report row with the same reason words the CLI's prepare uses
(`too_large`, `unreadable`), plus `unsafe_name` for a zip entry whose name tries to leave the
archive (`../x`, `/etc/x`, `C:\\x`). Whole-upload problems (too many files, an archive that
would expand past the limit) are one BadInput line, as `portrait prepare` gives for too many
photos. Zip members are read through a bounded reader, so a header that lies about the size
cannot make us inflate more than the limit.
"""

from __future__ import annotations

import io
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Iterable

from portrait.core.errors import BadInput
from portrait.core.io import write_bytes

from .policy import ServicePolicy

_EXTENSIONS = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tif",
               "GIF": ".gif", "HEIF": ".heic", "AVIF": ".avif"}
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
RATIO_MIN_BYTES = 1 << 16  # tiny members may compress a lot (a blank PNG); only big ones can be bombs


@dataclass(frozen=True)
class Upload:
    """One uploaded part: the client's file name (a label only) and a readable, seekable file."""

    filename: str
    file: BinaryIO


@dataclass
class Screened:
    accepted: list[tuple[str, bytes, str]] = field(default_factory=list)  # (label, data, extension)
    rejected: list[dict] = field(default_factory=list)  # report rows
    order: list[str] = field(default_factory=list)  # every label, in upload order

    def reject(self, label: str, reason: str, detail: str) -> None:
        self.order.append(label)
        self.rejected.append({"path": label, "status": "rejected", "reason": reason, "detail": detail, "faces": 0,
                              "scores": None})

    def accept(self, label: str, data: bytes, ext: str) -> None:
        self.order.append(label)
        self.accepted.append((label, data, ext))

    def write(self, folder: Path) -> dict[str, str]:
        """Store the accepted files as NNN.<ext>; returns stored path -> label."""
        stored = {}
        for i, (label, data, ext) in enumerate(self.accepted):
            stored[str(write_bytes(folder / f"{i:03d}{ext}", data))] = label
        return stored


def label(name: str | None) -> str:
    """A printable label from a client-given name: its last path part, no control characters."""
    base = re.split(r"[\\/]", name or "")[-1]
    base = re.sub(r"[\x00-\x1f\x7f]", "", base).strip()
    return base[:120] or "upload"


def sniff(data: bytes, policy: ServicePolicy) -> tuple[str | None, str | None, str]:
    """(extension, reason, detail): the image type from the header, or why it is refused."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            fmt = im.format or ""
    except Image.DecompressionBombError as exc:
        return None, "too_large", str(exc)
    except UnidentifiedImageError:
        return None, "unreadable", "not an image file"
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        return None, "unreadable", f"corrupt image data ({exc})"
    if w * h > policy.max_pixels:
        return None, "too_large", f"{w}x{h} is over the {policy.max_pixels:,} pixel limit"
    return _EXTENSIONS.get(fmt, ".img"), None, ""


def screen(uploads: Iterable[Upload], policy: ServicePolicy) -> Screened:
    out = Screened()
    expanded = 0
    for upload in uploads:
        name = label(upload.filename)
        head = upload.file.read(4)
        upload.file.seek(0)
        if head in _ZIP_MAGIC:
            expanded += _screen_zip(name, upload.file, policy, out, expanded)
        else:
            data = upload.file.read(policy.max_file_bytes + 1)
            _screen_bytes(name, data, policy, out)
        if len(out.order) > policy.max_files:
            raise BadInput(f"{len(out.order)} photos given; the limit is {policy.max_files}")
    if not out.order:
        raise BadInput("no files uploaded: send photos (or a zip of photos) as multipart `files`")
    return out


def _screen_bytes(name: str, data: bytes, policy: ServicePolicy, out: Screened) -> None:
    if len(data) > policy.max_file_bytes:
        out.reject(name, "too_large", f"over the {policy.max_file_bytes:,} byte limit")
        return
    ext, reason, detail = sniff(data, policy)
    if reason:
        out.reject(name, reason, detail)
    else:
        out.accept(name, data, ext)


def unsafe_member(name: str) -> bool:
    """True for a zip entry name that would leave the folder it is extracted into."""
    if not name or "\\" in name or name.startswith("/") or re.match(r"^[A-Za-z]:", name) or "\x00" in name:
        return True
    return any(part == ".." for part in PurePosixPath(name).parts)


def _hidden(name: str) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in PurePosixPath(name).parts if part != "..")


def _screen_zip(name: str, file: BinaryIO, policy: ServicePolicy, out: Screened, expanded_before: int) -> int:
    try:
        archive = zipfile.ZipFile(file)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        out.reject(name, "unreadable", f"not a readable zip archive ({exc})")
        return 0
    with archive:
        members = archive.infolist()
        if len(members) > policy.max_zip_members:
            raise BadInput(f"{name}: {len(members)} entries in one archive; the limit is {policy.max_zip_members}")
        declared = sum(m.file_size for m in members)
        if expanded_before + declared > policy.max_expanded_bytes:
            raise BadInput(f"{name}: expands to {declared:,} bytes, over the {policy.max_expanded_bytes:,} byte "
                           "limit (a zip bomb?)")
        read = 0
        for member in members:
            if unsafe_member(member.filename):
                shown = re.sub(r"[\x00-\x1f\x7f]", "", member.filename)[:120]
                out.reject(f"{name}::{shown}", "unsafe_name", "the entry's path leaves the archive")
                continue
            if member.is_dir() or _hidden(member.filename):
                continue
            entry = f"{name}::{label(member.filename)}"
            if member.file_size > policy.max_file_bytes:
                out.reject(entry, "too_large", f"{member.file_size:,} bytes is over the {policy.max_file_bytes:,} byte limit")
                continue
            ratio = member.file_size / max(member.compress_size, 1)
            if member.file_size > RATIO_MIN_BYTES and ratio > policy.max_zip_ratio:
                out.reject(entry, "too_large", f"compression ratio {ratio:.0f}:1 (a zip bomb?)")
                continue
            try:
                with archive.open(member) as fh:
                    data = fh.read(policy.max_file_bytes + 1)  # bounded, whatever the header claims
            except (zipfile.BadZipFile, RuntimeError, OSError, EOFError, NotImplementedError, ValueError) as exc:
                out.reject(entry, "unreadable", f"cannot extract ({exc})")
                continue
            read += len(data)
            if expanded_before + read > policy.max_expanded_bytes:
                raise BadInput(f"{name}: expands past the {policy.max_expanded_bytes:,} byte limit (a zip bomb?)")
            _screen_bytes(entry, data, policy, out)
            if len(out.order) > policy.max_files:
                raise BadInput(f"{len(out.order)} photos given; the limit is {policy.max_files}")
    return read
