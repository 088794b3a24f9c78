"""Backend `zimage`: Z-Image-Turbo (Apache-2.0) text to image for style templates, with the
identity's Z-Image LoRA when the bundle has one.

Z-Image-Turbo is a fast photoreal base (8 transformer passes at guidance 0, ZImagePipeline,
Qwen3 text encoder). It knows the person only through a LoRA trained on Z-Image (issue 28;
the LoRA trained on the undistilled base serves Turbo): with one, the template's
`{trigger} {class}` prompt paints the identity (identity mode `lora`); without one it paints
the style only and the finish's face fusion supplies the face (identity mode `none`, said in
results.json). A template's style LoRA for Z-Image composes with it as on SD (merge).

With guidance above 1 (Z-Image base presets) the negative prompt drives real CFG.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar, Iterator

from pydantic import Field

from portrait.core.backend import LORA_SELECTION, BackendSpec
from portrait.core.context import RunContext
from portrait.core.options import CommonOptions
from portrait.core.types import Candidate, GenerationRequest
from portrait.stages import frontier, loras
from portrait.stages.sd import model_info, to_uint8
from portrait.stages.seeding import seeded_candidates


class ZImageOptions(CommonOptions):
    cfg_normalization: bool = Field(False, description="Z-Image's CFG renormalisation (base model, guidance > 1)")
    cfg_truncation: float = Field(1.0, ge=0.0, le=1.0, description="stop CFG after this fraction of the steps")


def pipeline_args(ctx: RunContext, request: GenerationRequest, seed: int, options: ZImageOptions) -> dict[str, Any]:
    """The keyword arguments of one ZImagePipeline call."""
    args: dict[str, Any] = {
        "prompt": request.prompt,
        "height": request.height,
        "width": request.width,
        "num_inference_steps": request.steps,
        "guidance_scale": request.guidance,
        "max_sequence_length": frontier.max_sequence_length(ctx),
        "generator": frontier.seeded(seed),
        "output_type": "np",
    }
    if request.guidance > 1.0:
        args.update(negative_prompt=request.negative_prompt or None, cfg_normalization=options.cfg_normalization,
                    cfg_truncation=options.cfg_truncation)
    return args


def _registry_family(ctx: RunContext, style: dict[str, Any] | None) -> str | None:
    """The base family of a template's style LoRA when it is a registry id (a file: unknown)."""
    model = str((style or {}).get("model") or "")
    if not model or "/" in model or model.endswith(".safetensors") or model not in ctx.registry.specs:
        return None
    return ctx.registry.get(model).family


class ZImageBackend:
    name: ClassVar[str] = "zimage"

    def generate(self, request: GenerationRequest, ctx: RunContext) -> Iterator[Candidate]:
        started = time.perf_counter()
        options = SPEC.read(request)
        frontier.check_request(request, ctx, ("zimage",), "zimage")
        stack = []
        identity = loras.identity_use(request.identity, ctx.preset.family, request.lora_weight)
        if identity is not None:
            stack.append(identity)
        notes = []
        style_spec = request.resolved.style_lora
        style_family = _registry_family(ctx, style_spec)
        if style_spec and style_family not in (None, ctx.preset.family):
            # the style templates name SD style LoRAs: they do not fit Z-Image's transformer
            notes.append(f"style LoRA '{style_spec['model']}' is for {style_family}: not applied on {ctx.preset.family}")
        elif style_spec:
            stack.append(loras.style_use(ctx, style_spec))
        pipe = frontier.load_frontier_pipeline(ctx, request, "txt2img")
        loras.attach(pipe, stack)
        info: dict[str, Any] = {"identity_mode": "lora" if identity is not None else "none", "model": model_info(ctx),
                                "loras": [u.as_info() for u in stack],
                                "max_sequence_length": frontier.max_sequence_length(ctx)}
        if identity is None:
            notes.append("no zimage LoRA in the bundle: Z-Image painted the style only and the finish fuses the "
                         "face; train one with `portrait --preset zimage train`")
        if notes:
            info["note"] = "; ".join(notes)

        def render(seed: int):
            with loras.composed(pipe, stack, "merge"):
                return to_uint8(frontier.call(pipe, pipeline_args(ctx, request, seed, options))[0])

        yield from seeded_candidates(request, render, setup_seconds=time.perf_counter() - started, info=info)


SPEC = BackendSpec(
    name="zimage",
    families=("zimage",),
    make=ZImageBackend,
    help="Z-Image-Turbo text to image for style templates, with the identity's Z-Image LoRA (Apache-2.0)",
    options=ZImageOptions,
    models=("base",),
    conditioning=LORA_SELECTION,  # the LoRA's checkpoints were picked in the selection space
    style_lora=True,  # a template's style LoRA, beside the identity LoRA
)
