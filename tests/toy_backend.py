"""A toy generation backend that lives in one file of the tests folder: its options, its
pipeline, its declaration, the face-embedding space its (imagined) adapter was trained on, and
the kind of model it would load (an architecture: key detection and builder), added at run time
by `register()` (tests/test_backends.py sees it reach the CLI, the service's catalogue and the
web page, and sees its face space used). It embeds the identity's photos in its own space
(antelopev2 faces, normalized: a space no shipped adapter reads) and paints a flat card of a
chosen shade with seeded noise, so a real `portrait generate` run finishes without a diffusion
model."""

from __future__ import annotations

from typing import Iterator

import numpy as np
from pydantic import Field

from portrait.core import archs
from portrait.core.backend import AdapterSpace, BackendSpec
from portrait.core.modelfiles import Kind, Source
from portrait.core.options import CommonOptions, EmbedOptions
from portrait.core.types import Candidate, GenerationRequest
from portrait.stages import embed as emb
from portrait.stages.identity_inputs import embed_policy_of
from portrait.stages.seeding import seeded_candidates

# The toy adapter's face space: antelopev2 locates and embeds, normalized (InstantID and PuLID
# read this pack raw, InfiniteYou embeds with IR-SE50). Declared here, in the SPEC below, and
# nowhere else: stages/embed.py embeds in whatever space it is handed.
FACE_SPACE = AdapterSpace("toy", "antelopev2", "glintr100.onnx", normalized=True)


class ToyOptions(CommonOptions, EmbedOptions):
    toy_shade: int = Field(128, ge=0, le=255, description="the card's grey level")


class ToyBackend:
    def generate(self, request: GenerationRequest, ctx) -> Iterator[Candidate]:
        options = SPEC.read(request)
        found = emb.embed_identity(ctx, request.identity, SPEC.adapter_space(options), embed_policy_of(options))

        def render(seed: int) -> np.ndarray:
            noise = np.random.default_rng(seed).integers(-3, 4, size=(request.height, request.width, 3))
            return np.clip(options.toy_shade + noise, 0, 255).astype(np.uint8)

        yield from seeded_candidates(request, render, setup_seconds=0.0,
                                     info={"identity_mode": "toy", "shade": options.toy_shade,
                                           "embedding": found.info(),
                                           "embedding_norm": round(float(np.linalg.norm(found.vectors[0])), 4)})


SPEC = BackendSpec(
    name="toy",
    families=("sd15", "sdxl"),
    make=ToyBackend,
    help="a flat grey test card (tests/toy_backend.py)",
    options=ToyOptions,
    models=("face_pack_instantid",),  # the antelopev2 pack its face space names
    face_space=FACE_SPACE,
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
