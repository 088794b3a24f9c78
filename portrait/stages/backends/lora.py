"""Backend `lora` (FaceChain style): txt2img with the identity LoRA and a style template.

Optional per template: a style LoRA composed with the identity LoRA (merge / switch /
composite, see stages/loras.py), ControlNets fed from a pose image shipped with the
template (openpose / depth / canny), and LCM-LoRA fast mode (few steps, low guidance).
"""

from __future__ import annotations

import time
from typing import Iterator

from portrait.core.backend import LCM, BackendSpec
from portrait.core.context import RunContext
from portrait.core.errors import BadInput
from portrait.core.options import CommonOptions
from portrait.core.request import COMPOSITIONS
from portrait.core.types import Candidate, GenerationRequest
from portrait.stages import loras
from portrait.stages.identity_inputs import analyzer_face_finder, request_controls
from portrait.stages.sd import (
    call_pipeline,
    call_pipeline_batch,
    candidate_batch_size,
    control_kwargs,
    controlnet_ids,
    load_sd_pipeline,
    model_info,
    prepare_pipeline,
)
from portrait.stages.seeding import seeded_candidates


class LoraOptions(CommonOptions):
    """The lora backend reads only the resolver's keys (style LoRA, composition, controls)."""


class LoraBackend:
    def generate(self, request: GenerationRequest, ctx: RunContext) -> Iterator[Candidate]:
        started = time.perf_counter()
        family = ctx.preset.family
        r = request.resolved
        identity = loras.identity_use(request.identity, family, request.lora_weight)
        if identity is None:
            raise BadInput(f"identity '{request.identity.name}' has no {family} LoRA; run `portrait train` on a "
                           f"{family} preset, or use a zero-shot backend (--backend faceid|instantid|photomaker)")
        stack = [identity]
        style = loras.style_use(ctx, r.style_lora)
        if style is not None:
            stack.append(style)
        fast = loras.fast_use(ctx, r)
        if fast is not None:
            stack.append(fast)
        control_images = request_controls(ctx, request, find_faces=analyzer_face_finder(ctx, request))
        pipe = load_sd_pipeline(ctx, "txt2img", controlnet_ids(ctx, [c.name for c in control_images]))
        loras.attach(pipe, stack)
        prepare_pipeline(pipe, request, ctx)
        mode = r.composition if style is not None else "merge"
        info = {"identity_mode": "lora", "composition": mode, "model": model_info(ctx),
                "loras": [u.as_info() for u in stack],
                "controls": {c.name: {"strength": c.strength, "source": c.source} for c in control_images}}

        def render(seed: int):
            with loras.composed(pipe, stack, mode) as extra:
                return call_pipeline(pipe, request, seed, **control_kwargs(control_images), **extra)

        def render_batch(seeds: list[int]):
            with loras.composed(pipe, stack, mode) as extra:
                return call_pipeline_batch(pipe, request, seeds, **control_kwargs(control_images), **extra)

        yield from seeded_candidates(request, render, setup_seconds=time.perf_counter() - started, info=info,
                                     render_batch=render_batch, batch_size=candidate_batch_size(ctx, request))


SPEC = BackendSpec(
    name="lora",
    families=("sd15", "sdxl"),
    make=LoraBackend,
    help="txt2img with the identity's trained LoRA and a style template (FaceChain style)",
    options=LoraOptions,
    needs_lora=True,
    fast={"lcm": LCM},
    compositions=COMPOSITIONS,  # with a template's style LoRA (stages/loras.py composed)
    controls=True,
    style_lora=True,  # a template's style LoRA, beside the identity LoRA
)
