"""The training curve as a picture (`curve.png` in a bundle) and as a text sparkline.

Rows are the manifest's `validation` list: {"step", "score" (held-out likeness), "clip_t"
(prompt adherence, may be null), "selected"}; step 0 is the base model. Both series are drawn
on their own vertical scale (likeness in blue, CLIP-T in orange), selected checkpoints as
filled dots. Drawn with PIL only (matplotlib is not a runtime dependency).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

SPARKS = "▁▂▃▄▅▆▇█"

__all__ = ["curve_image", "sparkline"]


def sparkline(values: Sequence[float | None]) -> str:
    """One character per value, scaled between the series' min and max (blank for missing)."""
    present = [v for v in values if v is not None]
    if not present:
        return ""
    low, high = min(present), max(present)
    span = high - low or 1.0
    return "".join(" " if v is None else SPARKS[min(len(SPARKS) - 1, int((v - low) / span * (len(SPARKS) - 1) + 0.5))]
                   for v in values)


def curve_image(rows: Sequence[Mapping[str, Any]], size: tuple[int, int] = (480, 240)) -> np.ndarray:
    """An RGB uint8 plot of likeness and CLIP-T against steps."""
    from PIL import Image, ImageDraw

    width, height = size
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 40, width - 40, 20, height - 30
    draw.rectangle([left, top, right, bottom], outline=(180, 180, 180))
    steps = [int(r["step"]) for r in rows]
    if not steps:
        return np.asarray(image)
    last = max(steps) or 1

    def x_of(step: int) -> float:
        return left + (right - left) * step / last

    def series(key: str, color: tuple[int, int, int], label_x: int) -> None:
        points = [(int(r["step"]), float(r[key]), bool(r.get("selected"))) for r in rows if r.get(key) is not None]
        if not points:
            return
        values = [v for _s, v, _sel in points]
        low, high = min(values), max(values)
        span = (high - low) or 1.0

        def y_of(value: float) -> float:
            return bottom - (bottom - top) * (value - low) / span

        xy = [(x_of(s), y_of(v)) for s, v, _sel in points]
        if len(xy) > 1:
            draw.line(xy, fill=color, width=2)
        for (px, py), (_s, _v, selected) in zip(xy, points):
            r = 4 if selected else 2
            draw.ellipse([px - r, py - r, px + r, py + r], fill=color if selected else None, outline=color)
        draw.text((label_x, top - 15), f"{key} {low:.3f}-{high:.3f}", fill=color)

    series("score", (31, 119, 180), left)
    series("clip_t", (255, 127, 14), (left + right) // 2)
    draw.text((left, bottom + 8), "step 0", fill=(90, 90, 90))
    draw.text((right - 60, bottom + 8), f"step {last}", fill=(90, 90, 90))
    return np.asarray(image)
