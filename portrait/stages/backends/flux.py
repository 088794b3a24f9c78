"""Backend `flux`: FLUX.1-dev text-to-image on the flux preset, without identity conditioning.

The base every FLUX identity backend builds on, and what `portrait generate --preset flux`
runs by default: the likeness then comes only from the finish (face fusion with the
identity's reference face) and the ranking; use `--backend infiniteyou` for zero-shot
identity. Bundles hold no FLUX LoRA (training targets sd15/sdxl), so none is applied.

Options: true_cfg (1 = FLUX's distilled guidance only; > 1 adds a negative-prompt pass).
"""

from __future__ import annotations

import time
from typing import ClassVar, Iterator

from pydantic import Field

from portrait.core.backend import NO_FACE_SPACE, BackendSpec
from portrait.core.context import RunContext
from portrait.core.options import CommonOptions
from portrait.core.types import Candidate, GenerationRequest
from portrait.stages import flux
from portrait.stages.sd import model_info
from portrait.stages.seeding import seeded_candidates


class FluxOptions(CommonOptions):
    true_cfg: float = Field(1.0, ge=1.0, le=20.0, description="FLUX true CFG with the negative prompt "
                                                                "(1 = distilled guidance only, one pass per step)")


class FluxBackend:
    name: ClassVar[str] = "flux"
    families: ClassVar[tuple[str, ...]] = ("flux",)

    def generate(self, request: GenerationRequest, ctx: RunContext) -> Iterator[Candidate]:
        started = time.perf_counter()
        pipe = flux.load_flux_pipeline(ctx, request)
        info = {"identity_mode": "none", "model": model_info(ctx), "true_cfg": flux.true_cfg(request),
                "max_sequence_length": flux.max_sequence_length(ctx),
                "note": "FLUX text-to-image: no identity conditioning (the finish fuses the reference face); "
                        "use --backend infiniteyou for zero-shot identity"}
        yield from seeded_candidates(request, lambda seed: flux.call_flux(pipe, request, ctx, seed),
                                     setup_seconds=time.perf_counter() - started, info=info)


SPEC = BackendSpec(
    name="flux",
    families=("flux",),
    make=FluxBackend,
    help="FLUX.1-dev text-to-image, no identity conditioning (the finish fuses the face)",
    options=FluxOptions,
    models=("base",),
    license="FLUX.1-dev weights: non-commercial license",
    conditioning=NO_FACE_SPACE,  # plain text to image: the likeness comes from fusion
)
