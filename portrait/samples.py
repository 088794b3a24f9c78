"""A realistic demo photo set built from photos that ship in installed packages.

`write_sample_photos(folder)` writes several different shots of one person (the
astronaut from scikit-image: crops, a mirror image, an EXIF-rotated JPEG, a JPEG at
quality 30, a brighter exposure (x1.25)) plus one photo of someone else (Grace Hopper,
shipped as the hopper template's photo) as the outlier prepare must reject, and a
truncated JPEG (`unreadable`).
`majority="hopper"` swaps the roles.
Each shot is framed differently, the way real selfies are, so none is a near-duplicate
of another.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from portrait.core.io import write_bytes

# Crop boxes (x1, y1, x2, y2) per subject, chosen around where the face is in each photo
# (astronaut face ~(179,83)-(266,170) in 512x512; Hopper ~(161,137)-(376,352) in 512x600).
_FRAMES = {
    "astronaut": {
        "crop": (90, 10, 370, 290),
        "rotated": (40, 0, 420, 380),
        "q30": (120, 30, 330, 240),
        "bright": (60, 20, 400, 360),
    },
    "hopper": {
        "crop": (90, 60, 450, 420),
        "rotated": (40, 40, 512, 512),
        "q30": (130, 100, 410, 380),
        "bright": (60, 80, 480, 500),
    },
}


def astronaut_photo() -> np.ndarray:
    from skimage import data

    return np.ascontiguousarray(data.astronaut())


def hopper_photo() -> np.ndarray:
    """Commodore Grace M. Hopper (U.S. Navy, public domain): matplotlib's `grace_hopper.jpg`,
    byte for byte, which the package ships as the `hopper` photo template's image (so the
    runtime needs no matplotlib, a dev-only package)."""
    from importlib import resources

    from portrait.core.formats.images import read_rgb

    source = resources.files("portrait.templates") / "photos" / "hopper" / "template.jpg"
    with resources.as_file(source) as path:
        return read_rgb(path)


def group_photo() -> np.ndarray:
    """insightface's t1.jpg: six people, none of them the astronaut or Hopper."""
    import insightface

    from portrait.core.formats.images import read_rgb

    return read_rgb(Path(insightface.__file__).parent / "data" / "images" / "t1.jpg")


def _encode(image: np.ndarray, fmt: str, **options) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _crop(image: np.ndarray, box: tuple[int, int, int, int], size: int | None = None) -> np.ndarray:
    from PIL import Image

    x1, y1, x2, y2 = box
    part = image[y1:y2, x1:x2]
    if size:
        part = np.asarray(Image.fromarray(part).resize((size, size), Image.Resampling.LANCZOS))
    return np.ascontiguousarray(part)


def exif_rotated_jpeg(image: np.ndarray, quality: int = 92) -> bytes:
    """The pixels stored turned 90 degrees with EXIF orientation 6, as a phone writes them:
    a viewer that honours the tag shows `image` upright."""
    from PIL import Image

    stored = np.ascontiguousarray(np.rot90(image, k=1))  # counter-clockwise; tag 6 turns it back
    pil = Image.fromarray(stored)
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    pil.save(buffer, format="JPEG", quality=quality, exif=exif.tobytes())
    return buffer.getvalue()


def person_shots(image: np.ndarray, frames: dict[str, tuple[int, int, int, int]]) -> dict[str, bytes]:
    """File name suffix -> encoded bytes for the majority person's shots."""
    from PIL import ImageEnhance, Image

    bright = np.asarray(ImageEnhance.Brightness(Image.fromarray(_crop(image, frames["bright"]))).enhance(1.25))
    return {
        "original.png": _encode(image, "PNG"),
        "crop.jpg": _encode(_crop(image, frames["crop"], 448), "JPEG", quality=90),
        "flip.png": _encode(np.ascontiguousarray(image[:, ::-1]), "PNG"),
        "exif_rotated.jpg": exif_rotated_jpeg(_crop(image, frames["rotated"])),
        "jpeg_q30.jpg": _encode(_crop(image, frames["q30"], 400), "JPEG", quality=30),
        "bright.jpg": _encode(bright, "JPEG", quality=90),
    }


def write_sample_photos(folder: Path | str, *, majority: str = "astronaut", bad_file: bool = True) -> list[Path]:
    """Write the demo set into `folder` and return the paths: the majority person's shots, the
    outlier, and (with `bad_file`) a truncated JPEG that prepare reports as `unreadable`."""
    if majority not in _FRAMES:
        raise ValueError(f"majority must be one of {', '.join(_FRAMES)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    people = {"astronaut": astronaut_photo, "hopper": hopper_photo}
    outlier = "hopper" if majority == "astronaut" else "astronaut"
    paths = []
    for suffix, data in person_shots(people[majority](), _FRAMES[majority]).items():
        paths.append(write_bytes(folder / f"{majority}_{suffix}", data))
    paths.append(write_bytes(folder / f"{outlier}.jpg", _encode(people[outlier](), "JPEG", quality=92)))
    if bad_file:  # a copy cut off mid-transfer, as phones and chat apps sometimes leave
        whole = _encode(people[majority](), "JPEG", quality=92)
        paths.append(write_bytes(folder / "IMG_broken.jpg", whole[: len(whole) // 3]))
    return paths
