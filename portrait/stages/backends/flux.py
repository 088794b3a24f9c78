"""Backend `flux`: text-to-image on FLUX.1-dev or FLUX.2 [klein].

The base every FLUX identity backend builds on, and what `portrait generate --preset flux`
runs by default. When the identity's bundle holds a LoRA for the preset's family (`portrait
train` on a flux or klein preset), it is applied at the request's LoRA weight and the
likeness comes from it; without one there is no identity conditioning, and the likeness comes
only from the finish (face fusion with the identity's reference face) and the ranking: use
`--backend infiniteyou` for zero-shot identity on FLUX.1.

Options: true_cfg (FLUX.1 only: 1 = FLUX's distilled guidance only; > 1 adds a negative-prompt pass).
"""

from __future__ import annotations

import time
from typing import ClassVar, Iterator

from pydantic import Field

from portrait.core.backend import NO_FACE_SPACE, BackendSpec
from portrait.core.context import RunContext
from portrait.core.options import CommonOptions
from portrait.core.types import Candidate, GenerationRequest
from portrait.stages import flux, loras
from portrait.stages.sd import model_info
from portrait.stages.seeding import seeded_candidates


class FluxOptions(CommonOptions):
    true_cfg: float = Field(1.0, ge=1.0, le=20.0, description="FLUX true CFG with the negative prompt "
                                                                "(1 = distilled guidance only, one pass per step)")


class FluxBackend:
    name: ClassVar[str] = "flux"
    families: ClassVar[tuple[str, ...]] = flux.FLOW_FAMILIES

    def generate(self, request: GenerationRequest, ctx: RunContext) -> Iterator[Candidate]:
        started = time.perf_counter()
        pipe = flux.load_flux_pipeline(ctx, request, families=flux.FLOW_FAMILIES)
        identity = loras.identity_use(request.identity, ctx.preset.family, request.lora_weight)
        stack = [identity] if identity is not None else []
        loras.attach(pipe, stack)
        info = {"identity_mode": "lora" if stack else "none", "model": model_info(ctx),
                "loras": [u.as_info() for u in stack], "max_sequence_length": flux.max_sequence_length(ctx)}
        if ctx.preset.family == "flux":
            info["true_cfg"] = flux.true_cfg(request)
        if not stack:
            info["note"] = (f"{ctx.preset.family} text-to-image without an identity LoRA (the finish fuses the "
                            "reference face); train one with `portrait train` on this preset")

        def render(seed: int):
            with loras.composed(pipe, stack, "merge"):
                return flux.call_flux(pipe, request, ctx, seed)

        yield from seeded_candidates(request, render, setup_seconds=time.perf_counter() - started, info=info)


SPEC = BackendSpec(
    name="flux",
    families=flux.FLOW_FAMILIES,
    make=FluxBackend,
    help="FLUX.1-dev / FLUX.2 klein text-to-image with the identity's LoRA for that base when it has one, else no "
         "identity conditioning (the finish fuses the face)",
    options=FluxOptions,
    models=("base",),
    license="FLUX.1-dev weights: non-commercial license; FLUX.2 [klein] 4B: Apache-2.0",
    conditioning=NO_FACE_SPACE,  # plain text to image: the likeness comes from fusion
)
