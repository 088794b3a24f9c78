"""Images: one reader and one writer.

The reader always applies the EXIF orientation and converts to RGB: a phone photo stored
sideways with an Orientation tag is upright for PIL's display but not for `np.asarray`, and one
of the five readers this replaces skipped the transpose. A PNG the project wrote carries no
EXIF, so for those the transpose changes nothing (training data stays bit-identical).

User photos at ingest go through stages/ingest.decode_image instead: it reads bytes already
bounded by size, refuses decompression bombs by pixel count and maps 16-bit and alpha images
to RGB its own way, with reasons the prepare report lists.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from portrait.core.errors import bad_file
from portrait.core.io import write_image

__all__ = ["image_size", "read_image", "read_rgb", "write_image", "thumbnail_bytes"]


def read_image(path: Path | str):
    """A loaded PIL image, EXIF-transposed and in RGB; an unreadable file is one BadInput line."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as im:
            return ImageOps.exif_transpose(im).convert("RGB")
    except FileNotFoundError:
        raise bad_file(path, "no such file") from None
    except IsADirectoryError:
        raise bad_file(path, "is a folder, not an image") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise bad_file(path, f"unreadable image ({exc.__class__.__name__})") from None


def image_size(path: Path | str) -> tuple[int, int]:
    """(width, height) as the reader returns the image (upright), read from the header only."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as im:
            width, height = im.size
            # EXIF Orientation 5-8 store the picture turned a quarter: exif_transpose swaps the sides.
            if im.getexif().get(0x0112) in (5, 6, 7, 8):
                width, height = height, width
    except FileNotFoundError:
        raise bad_file(path, "no such file") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise bad_file(path, f"unreadable image ({exc.__class__.__name__})") from None
    return width, height


def read_rgb(path: Path | str) -> np.ndarray:
    """HxWx3 uint8 RGB, upright."""
    return np.asarray(read_image(path))


def thumbnail_bytes(path: Path | str, side: int, fmt: str = "JPEG", **save_args) -> bytes:
    """A thumbnail at most `side` px on its long edge, encoded in memory (service cards, reports)."""
    import io

    image = read_image(path)
    image.thumbnail((side, side))
    out = io.BytesIO()
    image.save(out, fmt, **save_args)
    return out.getvalue()


def rewrite_png_text(data: bytes, rewrite) -> bytes:
    """The PNG `data` with each text chunk's value passed through `rewrite(key, text) -> text`;
    every other chunk (the pixels included) is copied byte for byte.

    Why by hand: Pillow can read the text chunks but writes them only by re-encoding the whole
    image (seconds for a 4x-upscaled portrait, and not the same bytes); the chunk layout is
    fixed by the PNG spec (length, type, data, CRC-32 of type and data). tEXt is Latin-1, zTXt
    zlib-compressed Latin-1, iTXt UTF-8 (maybe compressed); a rewritten value is written as an
    uncompressed iTXt, which every reader of tEXt also reads."""
    import struct
    import zlib

    signature = b"\x89PNG\r\n\x1a\n"
    if not data.startswith(signature):
        raise ValueError("not a PNG")
    out, at = [signature], len(signature)
    while at + 8 <= len(data):
        (length,) = struct.unpack(">I", data[at:at + 4])
        kind = data[at + 4:at + 8]
        body = data[at + 8:at + 8 + length]
        end = at + 12 + length
        text = None
        if kind in (b"tEXt", b"zTXt", b"iTXt") and b"\0" in body:
            key, rest = body.split(b"\0", 1)
            if kind == b"tEXt":
                text = rest.decode("latin-1")
            elif kind == b"zTXt":
                text = zlib.decompress(rest[1:]).decode("latin-1")
            else:
                compressed, rest = rest[0], rest[2:]
                _lang, _translated, value = rest.split(b"\0", 2)
                text = (zlib.decompress(value) if compressed else value).decode("utf-8")
        if text is None:
            out.append(data[at:end])
        else:
            new = rewrite(key.decode("latin-1"), text)
            if new == text:
                out.append(data[at:end])
            else:
                payload = key + b"\0\0\0\0\0" + new.encode("utf-8")
                out.append(struct.pack(">I", len(payload)) + b"iTXt" + payload
                           + struct.pack(">I", zlib.crc32(b"iTXt" + payload) & 0xFFFFFFFF))
        at = end
        if kind == b"IEND":
            break
    return b"".join(out)
