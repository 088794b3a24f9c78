"""A toy generation backend that lives in one file of the tests folder: its options, its
pipeline, its declaration and the kind of model it would load (an architecture: key detection
and builder), added at run time by `register()` (tests/test_backends.py sees it reach the CLI,
the service's catalogue and the web page). It paints a flat card of a chosen shade with seeded
noise, so a real `portrait generate` run finishes without loading a model."""

from __future__ import annotations

from typing import Iterator

import numpy as np
from pydantic import Field

from portrait.core import archs
from portrait.core.backend import BackendSpec
from portrait.core.modelfiles import Kind, Source
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


def detect(keys) -> bool:
    """A toy card checkpoint: one `shade` tensor."""
    return set(keys) == {"shade"}


def build_card(source: Source):
    """A toy card's shade (kind "toy-card"): one tensor read through the model door."""
    state = source.weights()
    if not detect(state):
        raise ValueError(f"{source.path}: not a toy card")
    return float(state["shade"])


KIND = Kind("toy-card", build_card, detect=detect)


def register() -> None:
    """Everything a backend adds, from this one file: its backend row and its model kind."""
    from portrait.stages.backends import register as register_backend

    register_backend(SPEC, replace=True)
    archs.register(KIND)


def unregister() -> None:
    from portrait.stages.backends import unregister as unregister_backend

    unregister_backend(SPEC.name)
    archs.unregister(KIND.name)
