"""Backend `pulid-flux` (FLUX): PuLID-FLUX v0.9.1, ID tokens added to FLUX's image stream by
cross-attention modules after every 2nd double-stream and every 4th single-stream block.

The identity is read exactly as for PuLID on SDXL (stages/pulid_features.py: antelopev2 +
EVA02-CLIP of the aligned, parsed face into the IDFormer, 32 tokens of width 2048). The
transformer is the preset's diffusers FluxTransformer2DModel; the ID modules
(portrait.core.archs.pulid.PerceiverAttentionCA) are attached as forward hooks on the blocks
for the request and removed after it, so the cached pipeline stays plain.

Sampling follows the reference's `flux/sampling.denoise` on diffusers' parts: flow-matching
Euler over FLUX.1's shifted schedule (the same timesteps diffusers' FluxPipeline uses), the
distilled guidance embedded in every pass, the ID tokens from step `start_step` on (before
it the blocks run plain: the reference's `id=None`), and with `true_cfg` > 1 a second pass
from step `timestep_to_start_cfg` on with the negative prompt and the unconditional ID
tokens, combined as neg + true_cfg x (pos - neg).

Options: id_weight (1.0), start_step (0; the reference suggests 4 for more editability),
true_cfg (1.0; the reference recommends guidance 1 with true CFG), timestep_to_start_cfg (1),
id_mode all|mean|best, id_photos, face_locator, face_pack.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Literal

import numpy as np
from pydantic import Field

from portrait.core.steps import report_step
from portrait.core.backend import BackendSpec
from portrait.core.context import RunContext
from portrait.core.errors import BadInput
from portrait.core.options import CommonOptions, EmbedOptions
from portrait.core.types import Candidate, GenerationRequest
from portrait.stages import flux
from portrait.stages.identity_inputs import embed_policy_of
from portrait.stages.pulid_features import FACE_SPACE, pulid_inputs
from portrait.stages.sd import generator, model_info, to_uint8
from portrait.stages.seeding import seeded_candidates

if TYPE_CHECKING:  # the table imports this module for `generate --help`: torch loads inside generate
    from portrait.core.archs import pulid as arch


class PuLIDFluxOptions(CommonOptions, EmbedOptions):
    """PuLID-FLUX's options (defaults as in the reference demo, app_flux.py)."""

    id_mode: Literal["mean", "all", "best"] = Field("all", description="all: the photos' tokens side by side; "
                                                                       "mean; best (the reference reads one photo)")
    id_photos: int = Field(4, ge=1, le=64, description="the bundle's best photos")
    id_weight: float = Field(1.0, ge=0.0, le=5.0, description="weight of the ID cross-attention")
    start_step: int = Field(0, ge=0, le=1000, description="first step with ID tokens (higher: more editable)")
    true_cfg: float = Field(1.0, ge=1.0, le=20.0, description="true CFG scale with the negative prompt "
                                                                "(1 = distilled guidance only)")
    timestep_to_start_cfg: int = Field(1, ge=0, le=1000, description="first step of the true-CFG pass")


@dataclass(frozen=True)
class PuLIDFluxModels:
    model_id: str
    encoder: Any  # arch.IDFormer
    ca: Any  # nn.ModuleList of arch.PerceiverAttentionCA
    eva_id: str
    eva: Any  # arch.EvaVisual


def load_models(ctx: RunContext) -> PuLIDFluxModels:
    from portrait.core.models import load

    model_id, eva_id = ctx.preset.model("pulid_flux"), ctx.preset.model("eva_clip")
    encoder, ca = load(ctx, model_id, "pulid-flux")
    return PuLIDFluxModels(model_id, encoder, ca, eva_id, load(ctx, eva_id, "eva-clip"))


@contextlib.contextmanager
def attached(transformer, ca, weight: float) -> Iterator["arch.FluxIDState"]:
    """PuLID-FLUX's hooks on `transformer` for one block; the state's tokens switch them on."""
    from portrait.core.archs import pulid as arch

    state = arch.FluxIDState()
    state.weight = weight
    try:
        handles = arch.flux_id_hooks(transformer, ca, state)
    except ValueError as exc:
        raise BadInput(f"the PuLID-FLUX checkpoint does not fit this FLUX transformer: {exc}") from None
    try:
        yield state
    finally:
        for handle in handles:
            handle.remove()


def denoise(pipe, state: "arch.FluxIDState | None", tokens, *, prompt: str, negative: str, width: int, height: int,
            steps: int, guidance: float, seed: int, start_step: int = 0, true_cfg: float = 1.0,
            timestep_to_start_cfg: int = 1, max_sequence_length: int = 512, output_type: str = "np"):
    """PuLID-FLUX sampling on a Flux pipeline's modules; `tokens` = (uncond, cond) ID tokens.
    Returns the decoded image (HxWx3 in [0, 1]) or, with output_type="latent", packed latents."""
    import torch
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    device = pipe._execution_device
    embeds, pooled, text_ids = pipe.encode_prompt(prompt=prompt, prompt_2=None, device=device,
                                                  max_sequence_length=max_sequence_length)
    use_cfg = abs(true_cfg - 1.0) > 1e-2  # the reference's test
    if use_cfg:
        neg_embeds, neg_pooled, neg_ids = pipe.encode_prompt(prompt=negative, prompt_2=None, device=device,
                                                             max_sequence_length=max_sequence_length)
    channels = pipe.transformer.config.in_channels // 4
    latents, image_ids = pipe.prepare_latents(1, channels, height, width, embeds.dtype, device, generator(seed))
    config = pipe.scheduler.config
    mu = calculate_shift(latents.shape[1], config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                         config.get("base_shift", 0.5), config.get("max_shift", 1.15))
    timesteps, _ = retrieve_timesteps(pipe.scheduler, steps, device, sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    flux_guidance = torch.full((1,), guidance, device=device) if pipe.transformer.config.guidance_embeds else None
    uncond, cond = tokens if tokens is not None else (None, None)

    def run(ids, text, pooled_text, text_ids_, latents, timestep):
        if state is not None:
            state.tokens = ids
        return pipe.transformer(hidden_states=latents, timestep=timestep, guidance=flux_guidance,
                                pooled_projections=pooled_text, encoder_hidden_states=text, txt_ids=text_ids_,
                                img_ids=image_ids, return_dict=False)[0]

    try:
        for i, t in enumerate(timesteps):
            timestep = t.expand(1).to(latents.dtype) / 1000
            with_id = i >= start_step
            pred = run(cond if with_id else None, embeds, pooled, text_ids, latents, timestep)
            if use_cfg and i >= timestep_to_start_cfg:
                neg = run(uncond if with_id else None, neg_embeds, neg_pooled, neg_ids, latents, timestep)
                pred = neg + true_cfg * (pred - neg)
            latents = pipe.scheduler.step(pred, t, latents, return_dict=False)[0]
            report_step(i + 1, len(timesteps))
    finally:
        if state is not None:
            state.tokens = None
    if output_type == "latent":
        return latents
    vae = pipe.vae
    latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
    latents = latents / vae.config.scaling_factor + vae.config.shift_factor
    return pipe.image_processor.postprocess(vae.decode(latents.to(vae.dtype), return_dict=False)[0], output_type="np")[0]


class PuLIDFluxBackend:
    def generate(self, request: GenerationRequest, ctx: RunContext) -> Iterator[Candidate]:
        import torch

        started = time.perf_counter()
        options = SPEC.read(request)
        flux.check_request(request, ctx)
        models = load_models(ctx)
        inputs = pulid_inputs(ctx, request.identity, models, embed_policy_of(options))
        pipe = flux.load_flux_pipeline(ctx, request)
        msl = flux.max_sequence_length(ctx)
        info = {"identity_mode": "zero-shot", "model": model_info(ctx),
                "adapter": {"id": models.model_id, "eva_clip": models.eva_id, "id_weight": options.id_weight,
                            "start_step": options.start_step, "true_cfg": options.true_cfg,
                            "timestep_to_start_cfg": options.timestep_to_start_cfg,
                            "id_tokens": int(inputs.cond.shape[1])},
                "embedding": inputs.embedding.info(), "max_sequence_length": msl}
        tokens = (inputs.uncond, inputs.cond)

        with attached(pipe.transformer, models.ca, options.id_weight) as state:

            def render(seed: int) -> np.ndarray:
                with torch.inference_mode():
                    image = denoise(pipe, state, tokens, prompt=request.prompt, negative=request.negative_prompt,
                                    width=request.width, height=request.height, steps=request.steps,
                                    guidance=request.guidance, seed=seed, start_step=options.start_step,
                                    true_cfg=options.true_cfg, timestep_to_start_cfg=options.timestep_to_start_cfg,
                                    max_sequence_length=msl)
                return to_uint8(image)

            yield from seeded_candidates(request, render, setup_seconds=time.perf_counter() - started, info=info)


SPEC = BackendSpec(
    name="pulid-flux",
    families=("flux",),
    make=PuLIDFluxBackend,
    help="PuLID-FLUX v0.9.1: ID cross-attention in FLUX's double/single blocks (FLUX, zero-shot)",
    options=PuLIDFluxOptions,
    models=("base", "pulid_flux", "eva_clip", "face_pack_instantid", "face_parser"),
    license="PuLID-FLUX weights Apache-2.0, conditioned on antelopev2 (non-commercial); FLUX.1-dev non-commercial",
    face_space=FACE_SPACE,  # the PuLID encoder's (stages/pulid_features.py)
)
