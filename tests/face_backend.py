"""A test backend that paints the identity's own face on a backdrop (tests only).

Tiny models draw noise, so on the tiny preset no output has a face and `--keep` can only
report that nothing was kept. This backend stands in for a generator whose outputs are real
portraits: it cuts the head out of the identity's reference photo, feathers it into an
oval, and places it at a seeded size and position on a backdrop whose colour comes from the
prompt's words (so each cell of a shoot looks different), with a band of "outfit" colour
below. Some seeds are deliberately bad, so the keep loop has something to drop:
seed % 6 == 4 paints no face, seed % 6 == 5 a blurred face. Everything after the backend
(finishing, scoring in the independent space, the copy-paste guard, the keep loop, the
history, the service) is the real code.

Registered by `tests/conftest.py` fixtures with `register(SPEC)`, and in a `portrait serve`
child process through `PORTRAIT_BACKENDS=face_backend:SPEC` (with tests/ on PYTHONPATH).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from portrait.core.backend import NO_FACE_SPACE, BackendSpec
from portrait.core.options import CommonOptions
from portrait.core.types import Candidate, GenerationRequest
from portrait.stages.seeding import seeded_candidates

# prompt word -> RGB, first match wins (backdrops, then outfits)
BACKDROPS = {"grey": (128, 128, 132), "white": (236, 236, 232), "office": (176, 164, 140), "city": (84, 104, 140),
             "park": (96, 150, 80), "cafe": (150, 110, 80), "beach": (120, 190, 225)}
OUTFITS = {"navy": (30, 40, 90), "blazer": (60, 60, 66), "white shirt": (240, 240, 240), "sweater": (220, 210, 180),
           "denim": (70, 100, 150), "linen": (200, 195, 170)}


def _colour(prompt: str, table: dict[str, tuple[int, int, int]], default: tuple[int, int, int]):
    text = prompt.lower()
    return next((rgb for word, rgb in table.items() if word in text), default)


def head_box(face_box, shape) -> tuple[int, int, int, int]:
    """The head around a detected face box: hair above, chin and neck below."""
    x1, y1, x2, y2 = face_box
    w, h = x2 - x1, y2 - y1
    return (int(max(0, x1 - 0.45 * w)), int(max(0, y1 - 0.6 * h)), int(min(shape[1], x2 + 0.45 * w)),
            int(min(shape[0], y2 + 0.45 * h)))


def paint(reference: np.ndarray, head: tuple[int, int, int, int], prompt: str, width: int, height: int,
          seed: int) -> np.ndarray:
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    canvas = Image.new("RGB", (width, height), _colour(prompt, BACKDROPS, (140, 140, 150)))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((0, int(height * 0.78), width, height), fill=_colour(prompt, OUTFITS, (90, 90, 90)))
    if seed % 6 == 4:
        return np.asarray(canvas)
    head = Image.fromarray(reference).crop(head)
    side = int(min(width, height) * rng.uniform(0.62, 0.8))
    head = head.resize((side, int(side * head.height / head.width)), Image.LANCZOS)
    if seed % 6 == 5:
        head = head.filter(ImageFilter.GaussianBlur(radius=max(2, side // 60)))  # still found, but blurry
    mask = Image.new("L", head.size, 0)
    ImageDraw.Draw(mask).ellipse((2, 2, head.width - 3, head.height - 3), fill=255)
    mask = mask.filter(ImageFilter.GaussianBlur(radius=max(2, side // 40)))
    x = int(rng.integers(0, max(1, width - head.width + 1)))
    y = int(rng.integers(0, max(1, int(height * 0.85) - head.height + 1)))
    canvas.paste(head, (x, y), mask)
    return np.asarray(canvas)


class FaceCardBackend:
    def generate(self, request: GenerationRequest, ctx) -> Iterator[Candidate]:
        from portrait.core.formats.images import read_rgb

        from portrait.core.faces import make_analyzer

        reference = read_rgb(request.identity.reference)
        faces = make_analyzer(ctx, "dlib").detect(reference, embed=False)
        head = head_box(faces[0].box, reference.shape) if faces else (0, 0, reference.shape[1], reference.shape[0])

        def render(seed: int) -> np.ndarray:
            return paint(reference, head, request.prompt, request.width, request.height, seed)

        yield from seeded_candidates(request, render, setup_seconds=0.0, info={"identity_mode": "face card"})


SPEC = BackendSpec(
    name="facecard",
    families=("sd15", "sdxl"),
    make=FaceCardBackend,
    help="the identity's reference face on a backdrop (tests/face_backend.py)",
    options=CommonOptions,
    conditioning=NO_FACE_SPACE,
)
