"""Backend `kontext`: FLUX.1 Kontext [dev] edits one of the user's results (`portrait edit`).

Kontext is FLUX.1-dev fine-tuned to edit the picture it is given (FluxKontextPipeline: the
image's latents join the sequence, the prompt says what to change). It is the edit model users
of FLUX.1 know; its weights carry the FLUX.1 [dev] Non-Commercial License, so
`--license commercial` refuses it and names klein-ref / qwen-edit. It takes one picture: the
result being edited (no extra references), and the identity is kept only by the model and
then checked by the finish's re-scoring and gate.

It runs on the flux preset family, loading the preset's `kontext` role (FLUX.1-Kontext-dev;
tiny-flux's transformer under the tiny preset, which has FLUX.1's layout). Options: true_cfg
(> 1 adds a negative-prompt pass, as for FLUX.1).
"""

from __future__ import annotations

import time
from typing import Any, ClassVar, Iterator

from pydantic import Field

from portrait.core.backend import NO_FACE_SPACE, BackendSpec
from portrait.core.context import RunContext
from portrait.core.errors import BadInput
from portrait.core.options import CommonOptions
from portrait.core.types import Candidate, GenerationRequest
from portrait.stages import frontier, references
from portrait.stages.sd import model_info, to_uint8
from portrait.stages.seeding import seeded_candidates


class KontextOptions(CommonOptions):
    true_cfg: float = Field(1.0, ge=1.0, le=20.0, description="FLUX true CFG with the negative prompt "
                                                                "(1 = distilled guidance only, one pass per step)")


def pipeline_args(ctx: RunContext, request: GenerationRequest, prompt: str, picture, seed: int,
                  true_cfg: float) -> dict[str, Any]:
    """The keyword arguments of one FluxKontextPipeline call (Kontext resizes the image to its
    preferred resolution of the same aspect, as BFL's reference does)."""
    args: dict[str, Any] = {
        "image": picture.pil(),
        "prompt": prompt,
        "height": request.height,
        "width": request.width,
        "num_inference_steps": request.steps,
        "guidance_scale": request.guidance,
        "max_sequence_length": frontier.max_sequence_length(ctx),
        "generator": frontier.seeded(seed),
        "output_type": "np",
    }
    if true_cfg > 1.0:
        args.update(negative_prompt=request.negative_prompt or "", true_cfg_scale=true_cfg)
    return args


class KontextBackend:
    name: ClassVar[str] = "kontext"

    def generate(self, request: GenerationRequest, ctx: RunContext) -> Iterator[Candidate]:
        started = time.perf_counter()
        options = SPEC.read(request)
        frontier.check_request(request, ctx, ("flux",), "flux")
        edit = request.resolved.edit
        if not edit:
            raise BadInput("backend 'kontext' edits an image: run `portrait edit RESULT.png --prompt ... "
                           "--backend kontext`")
        if edit.get("references"):
            raise BadInput("--reference: kontext edits one image and takes no references "
                           "(use --backend klein-ref or qwen-edit)")
        (source,) = references.edit_pictures(edit, request.width, request.height, request.identity.name,
                                             request.resolved.edit_files)
        prompt = request.prompt
        pipe = frontier.load_frontier_pipeline(ctx, request, "edit", role="kontext")
        info = {"identity_mode": "edit", "model": model_info(ctx, "kontext"), "references": [source.info()],
                "prompt_sent": prompt, "true_cfg": options.true_cfg,
                "edit": {"source": edit["source"], "source_sha256": edit["source_sha256"]}}

        def render(seed: int):
            return to_uint8(frontier.call(pipe, pipeline_args(ctx, request, prompt, source, seed, options.true_cfg))[0])

        yield from seeded_candidates(request, render, setup_seconds=time.perf_counter() - started, info=info)


SPEC = BackendSpec(
    name="kontext",
    families=("flux",),
    make=KontextBackend,
    help="FLUX.1 Kontext [dev] edits a result (portrait edit; non-commercial weights)",
    options=KontextOptions,
    models=("kontext",),
    license="FLUX.1 Kontext [dev] weights: non-commercial license",
    conditioning=NO_FACE_SPACE,
)
