"""Calibrate each embedding space's similarity scale on the real photos that ship in packages.

For every space whose real models are present (dlib always; AuraFace, buffalo_l, antelopev2
after `portrait models download ...`), it embeds several shots of one person (the astronaut
and Grace Hopper: crops, mirror, JPEG q30, brighter, rotated; portrait.samples) and the six
strangers of insightface's t1.jpg, and prints same-person and different-person similarity
beside the threshold in use (portrait.core.faces.similarity_scale), and whether it separates.
Tiny stand-ins are skipped: their identities are meaningless by design.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/calibrate_faces.py
"""

from __future__ import annotations

import io
import itertools
import statistics

import numpy as np
from PIL import Image, ImageOps

from portrait.core.config import Settings
from portrait.core.errors import ModelMissing
from portrait.core.faces import make_analyzer, similarity
from portrait.core.registry import Registry
from portrait.samples import _FRAMES, astronaut_photo, group_photo, hopper_photo, person_shots

SPACES = {"dlib": None, "auraface": "auraface", "insightface:buffalo_l": "buffalo_l",
          "insightface:antelopev2": "antelopev2"}


def shots(photo: np.ndarray, frames) -> list[np.ndarray]:
    out = []
    for data in person_shots(photo, frames).values():
        with Image.open(io.BytesIO(data)) as im:
            out.append(np.asarray(ImageOps.exif_transpose(im).convert("RGB")))
    return out


def main() -> None:
    settings = Settings(preset="sd15")
    registry = Registry.load()
    people = {"astronaut": shots(astronaut_photo(), _FRAMES["astronaut"]),
              "hopper": shots(hopper_photo(), _FRAMES["hopper"])}
    print(f"{'space':24} {'same min':>9} {'same med':>9} {'diff med':>9} {'diff max':>9} {'threshold':>9}  separates")
    for space, model in SPACES.items():
        if model and not registry.is_present(model, settings):
            print(f"{space:24} not present (`portrait models download {model}`); not measured")
            continue
        try:
            analyzer = make_analyzer(None, space, registry=registry, settings=settings, landmarks68=False) \
                if space in ("dlib", "auraface") else make_analyzer(None, space, registry=registry, settings=settings)
        except ModelMissing as exc:
            print(f"{space:24} {exc}")
            continue
        emb = {name: [analyzer.detect(p)[0].embedding for p in photos] for name, photos in people.items()}
        strangers = [f.embedding for f in analyzer.detect(group_photo())]
        same = [similarity(a, b, space) for e in emb.values() for a, b in itertools.combinations(e, 2)]
        others = [emb["astronaut"][0], emb["hopper"][0], *strangers]
        diff = [similarity(a, b, space) for a, b in itertools.combinations(others, 2)]
        threshold = analyzer.scale.threshold
        print(f"{space:24} {min(same):9.3f} {statistics.median(same):9.3f} {statistics.median(diff):9.3f} "
              f"{max(diff):9.3f} {threshold:9.3f}  {min(same) > threshold > max(diff)}")


if __name__ == "__main__":
    main()
