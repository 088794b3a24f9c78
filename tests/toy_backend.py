"""A toy generation backend that lives in the tests folder: adding a backend is this one module
plus one `register(SPEC)` line (tests/test_backends.py). It paints a flat card of a chosen
shade with seeded noise, so a real `portrait generate` run finishes without loading a model."""

from __future__ import annotations

from typing import Iterator

import numpy as np
from pydantic import Field

from portrait.core.backend import BackendSpec
from portrait.core.options import CommonOptions
from portrait.core.types import Candidate, GenerationRequest
from portrait.stages.seeding import seeded_candidates


class ToyOptions(CommonOptions):
    toy_shade: int = Field(128, ge=0, le=255, description="the card's grey level")


class ToyBackend:
    def generate(self, request: GenerationRequest, ctx) -> Iterator[Candidate]:
        options = SPEC.read(request)

        def render(seed: int) -> np.ndarray:
            noise = np.random.default_rng(seed).integers(-3, 4, size=(request.height, request.width, 3))
            return np.clip(options.toy_shade + noise, 0, 255).astype(np.uint8)

        yield from seeded_candidates(request, render, setup_seconds=0.0,
                                     info={"identity_mode": "toy", "shade": options.toy_shade})


SPEC = BackendSpec(
    name="toy",
    families=("sd15", "sdxl"),
    make=ToyBackend,
    help="a flat grey test card (tests/toy_backend.py)",
    options=ToyOptions,
)
