"""Backend `lora` (FaceChain style): txt2img with the identity LoRA and a style template.

Optional per template: a style LoRA composed with the identity LoRA (merge / switch /
composite, see stages/loras.py), ControlNets fed from a pose image shipped with the
template (openpose / depth / canny), and LCM-LoRA fast mode (few steps, low guidance).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import ClassVar, Iterator

import numpy as np

from portrait.core.context import RunContext
from portrait.core.errors import BadInput
from portrait.core.types import Candidate, GenerationRequest
from portrait.stages import controls as ctl
from portrait.stages import loras
from portrait.stages.generate import seeded_candidates
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


class LoraBackend:
    name: ClassVar[str] = "lora"
    families: ClassVar[tuple[str, ...]] = ("sd15", "sdxl")

    def generate(self, request: GenerationRequest, ctx: RunContext) -> Iterator[Candidate]:
        started = time.perf_counter()
        family = ctx.preset.family
        identity = loras.identity_use(request.identity, family, request.lora_weight)
        if identity is None:
            raise BadInput(f"identity '{request.identity.name}' has no {family} LoRA; run `portrait train` on a "
                           f"{family} preset, or use a zero-shot backend (--backend faceid|instantid|photomaker)")
        stack = [identity]
        style = loras.style_use(ctx, request.options.get("style_lora"))
        if style is not None:
            stack.append(style)
        if request.options.get("fast") == "lcm":
            stack.append(loras.lcm_use(ctx))
        control_images = self._controls(request, ctx)
        pipe = load_sd_pipeline(ctx, "txt2img", controlnet_ids(ctx, [c.name for c in control_images]))
        loras.attach(pipe, stack)
        prepare_pipeline(pipe, request, ctx)
        mode = request.options.get("composition", "merge") if style is not None else "merge"
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

    def _controls(self, request: GenerationRequest, ctx: RunContext) -> list[ctl.ControlImage]:
        """Control maps from the template's pose images, at generation size."""
        images = request.options.get("control_images") or {}
        ranges = request.options.get("control_range") or {}
        preprocessed = set(request.options.get("control_preprocessed") or ())
        made = []
        for name, strength in request.controls.items():
            if name not in images:
                raise BadInput(f"template {request.template}: control '{name}' has no image to read it from")
            source = ctl.read_rgb(Path(images[name]))
            faces = None
            if name == "openpose" and name not in preprocessed:
                faces = _faces_for_pose(ctx, source, request)
            start, end = ranges.get(name, (0.0, 1.0))
            made.append(ctl.make_control(name, source, request.width, request.height, float(strength), ctx=ctx,
                                         faces=faces, preprocessed=name in preprocessed, start=start, end=end))
        return made


def _faces_for_pose(ctx: RunContext, image: np.ndarray, request: GenerationRequest):
    """Faces of a pose image, needed when the openpose map is drawn from landmarks."""
    if not ctx.preset.tiny:
        return None  # the annotator finds the pose itself
    from portrait.core.faces import make_analyzer

    faces = make_analyzer(ctx, request.options.get("face_backend", "dlib")).detect(image, embed=False)
    if not faces:
        raise BadInput(f"template {request.template}: no face found in its pose image")
    return faces
