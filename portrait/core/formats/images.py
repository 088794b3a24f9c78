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
