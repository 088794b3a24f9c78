"""Ingest: turn what the user gave (files, folders, zip archives) into decoded RGB photos.

Every input either becomes a `Photo` (EXIF orientation applied; CMYK, palette, alpha,
16-bit and grayscale converted to 8-bit RGB) or an `IngestRejection` with a stable reason:
`unreadable` (not an image, truncated, corrupt), `too_large` (pixel count over the
decompression-bomb guard), `too_small`, `duplicate` (same bytes, or a perceptual hash within
a few bits of a bigger photo already taken). Input files are only ever opened for reading.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Callable, ClassVar, Iterator, Sequence

import numpy as np
from pydantic import Field

from portrait.core.errors import BadInput, bad_file
from portrait.core.io import read_bounded, read_input, special_kind
from portrait.core.types import IngestRejection, Photo

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".heic", ".heif")


@dataclass(frozen=True)
class IngestPolicy:
    """The ingest settings of the preset's `prepare` section (the declaration: type, default, bounds)."""

    SECTION: ClassVar[str] = "prepare"

    max_pixels: Annotated[int, Field(ge=1)] = 80_000_000  # decompression-bomb guard: bigger photos are `too_large` (a 40 MP phone photo passes)
    max_file_bytes: Annotated[int, Field(ge=1)] = 200_000_000  # per file or zip member
    min_side: Annotated[int, Field(ge=1)] = 192  # px; a shorter side cannot give a usable face crop (`too_small`)
    duplicate_bits: Annotated[int, Field(ge=0, le=64)] = 5  # dHash distance at or below which two photos are one (`duplicate`)
    max_photos: Annotated[int, Field(ge=1)] = 500


@dataclass(frozen=True)
class Source:
    """One input item: a file on disk or a member of a zip archive (`archive.zip::member`)."""

    name: str
    read: Callable[[], bytes]
    size: int


@dataclass(frozen=True)
class IngestResult:
    photos: tuple[Photo, ...]
    rejected: tuple[IngestRejection, ...]
    order: tuple[str, ...]  # every source, in the order given (for reports)


class Unusable(Exception):
    """A source that cannot become a Photo; `reason` is one of the stable report words."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


# --- sources ------------------------------------------------------------------------------


def collect_sources(inputs: Sequence[str | Path], policy: IngestPolicy = IngestPolicy()) -> list[Source]:
    """Expand files, folders (images only, sorted, hidden files skipped) and zip archives.
    A FIFO, device or socket named explicitly is refused by type (inside a folder it is skipped)."""
    sources: list[Source] = []
    for item in inputs:
        path = Path(item).expanduser()
        try:
            mode = path.stat().st_mode
        except FileNotFoundError:
            raise bad_file(path, "no such file or folder") from None
        except PermissionError:
            raise bad_file(path, "permission denied") from None
        kind = special_kind(mode)
        if kind:
            raise bad_file(path, f"is a {kind}, not a photo, folder or zip archive")
        if path.is_dir():
            for child in sorted(p for p in path.rglob("*") if p.is_file() and not _hidden(p.relative_to(path))):
                if child.suffix.lower() == ".zip":
                    sources.extend(_zip_sources(child, policy))
                elif child.suffix.lower() in IMAGE_SUFFIXES:
                    sources.append(_file_source(child, policy))
        elif path.suffix.lower() == ".zip" and _is_zip(path):
            sources.extend(_zip_sources(path, policy))
        else:
            sources.append(_file_source(path, policy))  # named explicitly: try it whatever its suffix
    return sources


def _is_zip(path: Path) -> bool:
    try:
        return zipfile.is_zipfile(path)
    except OSError:
        return False


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in relative.parts)


def _file_source(path: Path, policy: IngestPolicy) -> Source:
    try:
        size = path.stat().st_size
    except OSError:
        size = 0

    def read() -> bytes:
        # Bounded: never more than max_file_bytes, whatever stat said (see core.io.read_input).
        try:
            return read_input(path, policy.max_file_bytes, "photo")
        except BadInput as exc:
            text = str(exc)
            reason = "too_large" if "byte limit" in text else "unreadable"
            raise Unusable(reason, text.split(": ", 1)[-1]) from None

    return Source(str(path), read, size)


def _zip_sources(path: Path, policy: IngestPolicy) -> Iterator[Source]:
    try:
        with zipfile.ZipFile(path) as zf:
            members = [m for m in zf.infolist() if not m.is_dir() and not _hidden(Path(m.filename))
                       and Path(m.filename).suffix.lower() in IMAGE_SUFFIXES]
    except (zipfile.BadZipFile, OSError) as exc:
        raise bad_file(path, f"not a readable zip archive ({exc})") from None
    for member in sorted(members, key=lambda m: m.filename):
        yield Source(f"{path}::{member.filename}", _member_reader(path, member.filename, policy.max_file_bytes),
                     member.file_size)


def _member_reader(path: Path, name: str, limit: int) -> Callable[[], bytes]:
    def read() -> bytes:
        # The header's size can lie (a zip bomb): read at most limit + 1 bytes.
        try:
            with zipfile.ZipFile(path) as zf, zf.open(name) as fh:
                data = read_bounded(fh, limit)
        except (zipfile.BadZipFile, OSError, EOFError, RuntimeError) as exc:  # RuntimeError: encrypted member
            raise Unusable("unreadable", f"cannot read it from the archive ({exc})") from None
        if len(data) > limit:
            raise Unusable("too_large", f"over the {limit:,} byte limit")
        return data

    return read


# --- decoding --------------------------------------------------------------------------------


def decode_image(data: bytes, policy: IngestPolicy) -> np.ndarray:
    """Bytes -> HxWx3 uint8 RGB with EXIF orientation applied, or raise Unusable."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    _register_heif()
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > policy.max_pixels:
                raise Unusable("too_large", f"{w}x{h} is over the {policy.max_pixels:,} pixel limit")
            im.load()
            im = ImageOps.exif_transpose(im)
            return to_rgb(im)
    except Image.DecompressionBombError as exc:
        raise Unusable("too_large", str(exc)) from None
    except UnidentifiedImageError:
        if _looks_heif(data) and not _heif_available():
            raise Unusable("unreadable", HEIC_HINT) from None
        raise Unusable("unreadable", "not an image file") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # truncated / corrupt data
        raise Unusable("unreadable", f"corrupt image data ({exc})") from None


HEIC_HINT = "HEIC needs: pip install 'portrait[heic]'"


def _looks_heif(data: bytes) -> bool:
    """An ISO-BMFF `ftyp` box with a HEIF brand (what iPhones write as .heic)."""
    return len(data) >= 12 and data[4:8] == b"ftyp" and data[8:12] in (
        b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1")


def _heif_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("pillow_heif") is not None


def _register_heif() -> None:
    try:
        import pillow_heif  # optional extra: portrait[heic]

        pillow_heif.register_heif_opener()
    except ImportError:
        pass


def to_rgb(im) -> np.ndarray:
    """Any PIL mode -> 8-bit RGB. Alpha is composited on white (a studio backdrop), 16-bit and
    float data are scaled rather than clipped, CMYK goes through its ICC profile when it has one."""
    from PIL import Image

    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        peak = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        if mode == "F":
            peak = max(float(arr.max()), 1.0) if arr.max() > 1.0 else 1.0
        gray = np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "CMYK":
        return np.asarray(_cmyk_to_rgb(im), dtype=np.uint8)
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        backdrop = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(backdrop, rgba).convert("RGB"), dtype=np.uint8)
    return np.ascontiguousarray(np.asarray(im.convert("RGB"), dtype=np.uint8))


def _cmyk_to_rgb(im):
    profile = im.info.get("icc_profile")
    if profile:
        try:
            from PIL import ImageCms

            src = ImageCms.ImageCmsProfile(io.BytesIO(profile))
            return ImageCms.profileToProfile(im, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except Exception:  # a broken embedded profile: fall back to the naive conversion
            pass
    return im.convert("RGB")


# --- duplicates ------------------------------------------------------------------------------


def perceptual_hash(image: np.ndarray) -> int:
    """64-bit difference hash (dHash) of a 9x8 grayscale thumbnail.

    Hand-written (10 lines) rather than adding the `imagehash` dependency; dHash survives
    re-encoding, resizing and brightness changes, which is what a re-saved copy looks like.
    """
    from PIL import Image

    gray = Image.fromarray(image).convert("L").resize((9, 8), Image.Resampling.LANCZOS)
    pixels = np.asarray(gray, dtype=np.int16)
    bits = (pixels[:, 1:] > pixels[:, :-1]).ravel()
    return int("".join("1" if b else "0" for b in bits), 2)


def hamming(a: int, b: int) -> int:
    return bin(a ^ b).count("1")


# --- the stage -------------------------------------------------------------------------------


def ingest(inputs: Sequence[str | Path], policy: IngestPolicy = IngestPolicy(),
           progress: Callable[[str, float, float], None] | None = None) -> IngestResult:
    sources = collect_sources(inputs, policy)
    if not sources:
        raise BadInput(f"{', '.join(str(i) for i in inputs)}: no image files found")
    if len(sources) > policy.max_photos:
        raise BadInput(f"{len(sources)} photos given; the limit is {policy.max_photos}")
    decoded: list[Photo] = []
    rejected: list[IngestRejection] = []
    for i, source in enumerate(sources):
        try:
            decoded.append(_load(source, policy))
        except Unusable as exc:
            rejected.append(IngestRejection(source.name, exc.reason, exc.detail))
        if progress:
            progress("reading photos", i + 1, len(sources))
    photos, duplicates = drop_duplicates(decoded, policy.duplicate_bits)
    order = tuple(s.name for s in sources)
    return IngestResult(tuple(photos), tuple(rejected + duplicates), order)


def _load(source: Source, policy: IngestPolicy) -> Photo:
    if source.size > policy.max_file_bytes:
        raise Unusable("too_large", f"{source.size:,} bytes is over the {policy.max_file_bytes:,} byte limit")
    data = source.read()
    if len(data) > policy.max_file_bytes:
        raise Unusable("too_large", f"{len(data):,} bytes is over the {policy.max_file_bytes:,} byte limit")
    image = decode_image(data, policy)
    h, w = image.shape[:2]
    if min(h, w) < policy.min_side:
        raise Unusable("too_small", f"{w}x{h}: the shorter side is under {policy.min_side} px")
    return Photo(source=source.name, image=image, sha256=hashlib.sha256(data).hexdigest())


def drop_duplicates(photos: Sequence[Photo], max_bits: int) -> tuple[list[Photo], list[IngestRejection]]:
    """Keep the biggest of each group of identical or near-identical photos; keep input order."""
    by_size = sorted(range(len(photos)), key=lambda i: -photos[i].image.shape[0] * photos[i].image.shape[1])
    kept: list[int] = []
    hashes: dict[int, int] = {}
    rejected: dict[int, IngestRejection] = {}
    for i in by_size:
        photo = photos[i]
        hashes[i] = perceptual_hash(photo.image)
        twin = next((k for k in kept if photos[k].sha256 == photo.sha256 or hamming(hashes[k], hashes[i]) <= max_bits),
                    None)
        if twin is None:
            kept.append(i)
        else:
            rejected[i] = IngestRejection(photo.source, "duplicate", f"same picture as {photos[twin].source}")
    keep = sorted(kept)
    return [photos[i] for i in keep], [rejected[i] for i in sorted(rejected)]
