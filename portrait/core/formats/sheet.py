"""Contact sheets: one grid writer for every sheet the project makes.

prepare's sheet shows every input photo with a kept/rejected band and its reason; generate's
shows the candidates in rank order with their scores and a green/red frame for the gate. Both
are the same thing, a grid of captioned thumbnails with optional face boxes, so the flows build
`Tile`s and this module draws and writes them (atomically, as PNG).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from portrait.core.io import write_image

RGB = tuple[int, int, int]

__all__ = ["Tile", "FaceBox", "write_contact_sheet"]


@dataclass(frozen=True)
class FaceBox:
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in the tile image's pixels
    colour: RGB
    label: str = ""


@dataclass(frozen=True)
class Tile:
    image: np.ndarray | None  # RGB uint8; None draws a cross (an input that could not be decoded)
    lines: tuple[tuple[str, RGB], ...] = ()  # caption lines under the picture, with their colours
    frame: RGB | None = None  # an outline around the picture cell
    band: RGB | None = None  # a fill behind the caption
    boxes: tuple[FaceBox, ...] = ()


def write_contact_sheet(target: Path | str, tiles: Sequence[Tile], *, thumb: int = 256, columns: int = 4,
                        caption_h: int = 44, gap: int = 8, background: RGB = (24, 24, 24),
                        enlarge: bool = False) -> Path:
    """Draw `tiles` in a grid of `columns` (fewer when there are fewer tiles) and write it to
    `target`. Pictures are fitted into `thumb` x `thumb` (scaled up only with `enlarge`)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    columns = max(1, min(columns, len(tiles)))
    rows = max(1, -(-len(tiles) // columns))
    sheet = Image.new("RGB", (columns * (thumb + gap) + gap, rows * (thumb + caption_h + gap) + gap), background)
    draw = ImageDraw.Draw(sheet)
    for index, tile in enumerate(tiles):
        x = gap + (index % columns) * (thumb + gap)
        y = gap + (index // columns) * (thumb + caption_h + gap)
        if tile.image is not None:
            pic = Image.fromarray(np.ascontiguousarray(tile.image))
            scale = thumb / max(pic.size)
            if not enlarge:
                scale = min(scale, 1.0)
            size = (max(1, round(pic.width * scale)), max(1, round(pic.height * scale)))
            pic = pic.resize(size, Image.Resampling.LANCZOS) if size != pic.size else pic
            ox, oy = x + (thumb - pic.width) // 2, y + (thumb - pic.height) // 2
            sheet.paste(pic, (ox, oy))
            for face in tile.boxes:
                x0, y0, x1, y1 = (ox + face.box[0] * scale, oy + face.box[1] * scale,
                                  ox + face.box[2] * scale, oy + face.box[3] * scale)
                draw.rectangle([x0, y0, x1, y1], outline=face.colour, width=2)
                if face.label:
                    draw.text((x0 + 2, y0 + 1), face.label, fill=face.colour, font=font)
        else:
            grey = (120, 120, 120)
            draw.line((x + 20, y + 20, x + thumb - 20, y + thumb - 20), fill=grey, width=3)
            draw.line((x + 20, y + thumb - 20, x + thumb - 20, y + 20), fill=grey, width=3)
        if tile.frame is not None:
            draw.rectangle([x - 3, y - 3, x + thumb + 2, y + thumb + 2], outline=tile.frame, width=3)
        if tile.band is not None:
            draw.rectangle((x, y + thumb, x + thumb - 1, y + thumb + caption_h - 1), fill=tile.band)
        for i, (text, colour) in enumerate(tile.lines):
            draw.text((x + 4, y + thumb + 3 + 14 * i), text, fill=colour, font=font)
    return write_image(target, np.asarray(sheet))
