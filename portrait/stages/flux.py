"""What the FLUX backends share: the base pipeline, its sampler, and one seeded call.

FLUX.1-dev differs from SD where a caller would trip: guidance is a distilled embedding fed
to the transformer (one pass per step, no CFG batch), the only sampler is flow-matching Euler
with a resolution-dependent shift, the prompt goes to CLIP-L (pooled) and T5 (up to 512
tokens), and a negative prompt does nothing unless true CFG is asked for (`true_cfg` > 1,
two passes per step). Pipelines come from portrait.core.loaders like the SD ones.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from portrait.core.context import RunContext
from portrait.core.steps import step_callback
from portrait.core.types import GenerationRequest
from portrait.stages import frontier
from portrait.stages.sd import generator, prepare_pipeline, to_uint8

SAMPLER = frontier.SAMPLER
# The bases the `flux` backend renders text to image on (with the identity's LoRA for that base
# when the bundle has one): FLUX.1 and FLUX.2 [klein]; InfiniteYou and PuLID-FLUX need FLUX.1
# itself, Z-Image has its own backend (`zimage`).
FLOW_FAMILIES = ("flux", "flux2-klein")


def check_request(request: GenerationRequest, ctx: RunContext, families: tuple[str, ...] = ("flux",)) -> None:
    """FLUX runs on the flux family (or `families`) with its flow-matching sampler, at sizes of
    16 px: the frontier families' one check (stages/frontier.py)."""
    frontier.check_request(request, ctx, families, "flux")


# The preset's generate.max_sequence_length (FLUX.1-dev 512; declared and bounded in
# stages/generate.GeneratePolicy, which checks the preset before a request resolves).
max_sequence_length = frontier.max_sequence_length


def load_flux_pipeline(ctx: RunContext, request: GenerationRequest, kind: str = "txt2img",
                       families: tuple[str, ...] = ("flux",)):
    """The preset's FLUX (or other flow-matching) base as a diffusers pipeline, with sampler and
    memory options set."""
    from portrait.stages.sd import load_sd_pipeline

    check_request(request, ctx, families)
    pipe = load_sd_pipeline(ctx, kind)
    prepare_pipeline(pipe, request, ctx)
    return pipe


def true_cfg(request: GenerationRequest) -> float:
    """Option true_cfg (declared with bounds by the FLUX backends' options; 1 for a backend without it)."""
    return float(getattr(request.options, "true_cfg", None) or 1.0)


def call_args(request: GenerationRequest, ctx: RunContext, seed: int) -> dict[str, Any]:
    """The keyword arguments of one FluxPipeline call for this request and seed (a FLUX.2 [klein]
    pipeline takes no negative prompt: the distilled one has no CFG, the base's runs on an empty one)."""
    cfg = true_cfg(request)
    if ctx.preset.family != "flux":
        return {"prompt": request.prompt, "num_inference_steps": request.steps, "guidance_scale": request.guidance,
                "width": request.width, "height": request.height, "max_sequence_length": max_sequence_length(ctx),
                "generator": generator(seed)}
    args: dict[str, Any] = {
        "prompt": request.prompt,
        "num_inference_steps": request.steps,
        "guidance_scale": request.guidance,
        "width": request.width,
        "height": request.height,
        "max_sequence_length": max_sequence_length(ctx),
        "generator": generator(seed),
    }
    if cfg > 1.0:
        args.update(negative_prompt=request.negative_prompt or "", true_cfg_scale=cfg)
    return args


def call_flux(pipe, request: GenerationRequest, ctx: RunContext, seed: int, **kwargs: Any) -> np.ndarray:
    """One seeded FLUX call -> HxWx3 uint8 RGB."""
    import torch

    args = {**call_args(request, ctx, seed), "output_type": "np", **kwargs}
    args.update(step_callback(pipe, args))  # each step reported to the flow's hook (progress, cancel)
    with torch.inference_mode():
        out = pipe(**args)
    return to_uint8(out.images[0])
