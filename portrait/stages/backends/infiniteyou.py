"""Backend `infiniteyou` (FLUX.1-dev): ByteDance's InfiniteYou, zero-shot identity by InfuseNet.

The identity's ArcFace embedding (one vector, the mean direction of its photos; or every
photo's with id_mode=all, as the Resampler reads a sequence) is projected by InfiniteYou's
Resampler (portrait/core/archs/infiniteyou.py) to 8 identity tokens. The InfuseNet, a
FluxControlNetModel, reads those tokens as its `encoder_hidden_states` (never the text) with
the VAE-encoded control image (the face keypoints of an optional pose image, else a black
canvas) and hands its residuals to the FLUX transformer's double and single blocks, scaled
by `infusenet_conditioning_scale` on the steps inside [infusenet_guidance_start, _end]. The
transformer reads the prompt as usual, with FLUX's distilled guidance; the InfuseNet gets
guidance 1.0, as InfiniteYou's pipeline passes it.

`denoise()` runs on components handed to it (a Flux pipeline's modules, an InfuseNet, the
tokens), so the test runs it beside InfiniteYou's own FluxInfuseNetPipeline on the same tiny
weights. Variants: `aes_stage2` (default, aesthetics) and `sim_stage1` (similarity).

Options: infusenet_conditioning_scale (1.0), infusenet_guidance_start (0.0),
infusenet_guidance_end (1.0), infiniteyou_variant, control_image, id_mode, id_photos,
face_locator.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterator, Literal

import numpy as np

from pydantic import Field

from portrait.core.steps import report_step
from portrait.core.backend import AdapterSpace, BackendSpec
from portrait.core.context import RunContext
from portrait.core.errors import BadInput
from portrait.core.models import load as load_model
from portrait.core.options import ASSET, CommonOptions, EmbedOptions
from portrait.core.types import Candidate, GenerationRequest
from portrait.stages import embed as emb
from portrait.stages import flux
from portrait.stages.identity_inputs import embed_policy_of
from portrait.stages.keypoints import draw_kps
from portrait.stages.sd import model_info, to_uint8
from portrait.stages.seeding import seeded_candidates

VARIANTS = {"aes_stage2": "infiniteyou_aes", "sim_stage1": "infiniteyou_sim"}  # variant -> preset role

# InfiniteYou's face space: antelopev2 finds the face, facexlib's ArcFace IR-SE50 (the preset's
# `arcface_infiniteyou` role, a torch network) embeds it, normalized, as its
# `extract_arcface_bgr_embedding` does.
FACE_SPACE = AdapterSpace("infiniteyou", "antelopev2", "glintr100.onnx", normalized=True, arcface="arcface_infiniteyou")


class InfiniteYouOptions(CommonOptions, EmbedOptions):
    """InfiniteYou's options (defaults as in its pipeline)."""

    infusenet_conditioning_scale: float = Field(1.0, ge=0.0, le=5.0, description="InfuseNet residual scale")
    infusenet_guidance_start: float = Field(0.0, ge=0.0, le=1.0, description="first fraction of steps with identity")
    infusenet_guidance_end: float = Field(1.0, ge=0.0, le=1.0, description="last fraction of steps with identity")
    infiniteyou_variant: Literal["aes_stage2", "sim_stage1"] = Field(
        "aes_stage2", description="aes_stage2 (aesthetics) or sim_stage1 (identity similarity)")
    control_image: str | None = Field(None, min_length=1, description="pose image whose face keypoints the "
                                                                      "InfuseNet reads (default: a black canvas)",
                                      json_schema_extra=ASSET)


@dataclass(frozen=True)
class InfiniteYouPolicy:
    """InfiniteYou's knobs, defaults as its pipeline's."""

    variant: str = "aes_stage2"
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0

    @classmethod
    def from_options(cls, options: InfiniteYouOptions) -> "InfiniteYouPolicy":
        policy = cls(variant=options.infiniteyou_variant, scale=float(options.infusenet_conditioning_scale),
                     start=float(options.infusenet_guidance_start), end=float(options.infusenet_guidance_end))
        if policy.start > policy.end:
            raise BadInput(f"--option infusenet_guidance_start={policy.start:g} is after "
                           f"infusenet_guidance_end={policy.end:g}")
        return policy


@dataclass(frozen=True)
class InfiniteYouModels:
    model_id: str
    infusenet: Any  # FluxControlNetModel
    projection: Any  # portrait.core.archs.infiniteyou.IdProjection


def load_models(ctx: RunContext, policy: InfiniteYouPolicy) -> InfiniteYouModels:
    """The variant's InfuseNet (kind "controlnet": a FluxControlNetModel folder) and its
    projection (kind "infiniteyou-projection"), both through the model door."""
    from portrait.core.loaders import load_controlnet, quantize_module

    model_id = ctx.preset.model(VARIANTS[policy.variant])
    resolved = ctx.resolve(model_id)
    infusenet = load_controlnet(ctx, model_id)
    if infusenet.__class__.__name__ != "FluxControlNetModel":
        raise BadInput(f"model '{model_id}': its InfuseNetModel/ is not a FluxControlNetModel")
    # The memory plan's scheme for the InfuseNet (runtime.quantize applies to it too, as
    # InfiniteYou's --quantize_8bit does; the plan may also quantize it to fit the card).
    plan = getattr(ctx, "plan", None)
    scheme = plan.part_quant(f"infusenet:{model_id}") if plan is not None else \
        str(ctx.preset.section("runtime").get("quantize", "none"))
    quantize_module(infusenet, scheme)
    name = next(f for f in resolved.files if f.endswith("image_proj_model.bin"))
    return InfiniteYouModels(model_id, infusenet, load_model(ctx, model_id, "infiniteyou-projection", file=name))


def id_tokens(projection, vectors: np.ndarray):
    """(k, 512) embeddings -> [1, N, D] identity tokens (k photos read as one sequence)."""
    import torch

    where = next(projection.parameters())
    embedding = torch.from_numpy(np.asarray(vectors, dtype=np.float32)).reshape(1, -1, vectors.shape[-1])
    with torch.no_grad():
        return projection(embedding.to(where.device, where.dtype))


def resize_and_pad(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """InfiniteYou's control-image fit: the shorter target side sets the scale (Lanczos), the
    result is centred on white (and cropped where it overflows)."""
    from PIL import Image

    h, w = image.shape[:2]
    if width <= height:
        new_w, new_h = width, int(width * (h / w))
    else:
        new_w, new_h = int(height * (w / h)), height
    resized = Image.fromarray(image).resize((new_w, new_h), Image.LANCZOS)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    canvas.paste(resized, ((width - new_w) // 2, (height - new_h) // 2))
    return np.asarray(canvas)


def control_image(ctx: RunContext, request: GenerationRequest, policy: emb.EmbedPolicy,
                  path: str | None) -> tuple[np.ndarray, str]:
    """The InfuseNet's image: keypoints of the pose image's largest face, else black."""
    if not path:
        return np.zeros((request.height, request.width, 3), dtype=np.uint8), "none (black)"
    image = emb.read_rgb(Path(path).expanduser())
    fitted = resize_and_pad(image, request.width, request.height)
    kps = emb.pose_keypoints(ctx, fitted, f"--option control_image {path}", FACE_SPACE, policy)
    return draw_kps(request.width, request.height, kps), f"keypoints of {path}"


def denoise(pipe, infusenet, tokens, *, prompt: str, width: int, height: int, steps: int, guidance: float,
            seed: int, control: np.ndarray, scale: float = 1.0, start: float = 0.0, end: float = 1.0,
            max_sequence_length: int = 512, output_type: str = "np"):
    """InfiniteYou's sampling loop on the modules of a Flux pipeline `pipe`.

    Returns the decoded image (HxWx3 float in [0, 1]) or, with output_type="latent", the
    packed latents. Randomness follows InfiniteYou's entry point (`InfUFluxPipeline.__call__`):
    it seeds the global RNG (`seed_everything`) and calls its pipeline without a generator, so
    the control image's VAE sample and then the initial noise are drawn in that order from the
    default generator of the device the pipeline runs on. Here one generator, seeded with
    `seed` on that device, draws both in the same order: the same seed gives the reference's
    image on CPU and on CUDA (a CUDA generator reproduces `torch.cuda.manual_seed`'s stream).
    """
    import torch
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
    from PIL import Image

    device = pipe._execution_device
    prompt_embeds, pooled, text_ids = pipe.encode_prompt(prompt=prompt, prompt_2=None, device=device,
                                                         max_sequence_length=max_sequence_length)
    tokens = tokens.to(device=device, dtype=prompt_embeds.dtype)
    token_ids = torch.zeros(tokens.shape[1], 3, device=device, dtype=prompt_embeds.dtype)
    vae = pipe.vae
    image = pipe.image_processor.preprocess(Image.fromarray(control), height=height, width=width)
    # preprocess() returns a channels-last view; the VAE's convolutions on it differ from the
    # contiguous tensor InfiniteYou's prepare_image() makes by up to 4e-3 (tiny VAE, measured).
    image = image.to(device=device, dtype=vae.dtype).contiguous()
    rng = torch.Generator(device=device).manual_seed(int(seed))  # one stream: VAE sample first, then the noise
    cond = vae.encode(image).latent_dist.sample(rng)
    cond = (cond - vae.config.shift_factor) * vae.config.scaling_factor
    channels = pipe.transformer.config.in_channels // 4
    cond = pipe._pack_latents(cond, 1, channels, cond.shape[2], cond.shape[3])
    latents, image_ids = pipe.prepare_latents(1, channels, height, width, prompt_embeds.dtype, device, rng)
    sigmas = np.linspace(1.0, 1 / steps, steps)
    config = pipe.scheduler.config
    mu = calculate_shift(latents.shape[1], config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                         config.get("base_shift", 0.5), config.get("max_shift", 1.15))
    timesteps, _ = retrieve_timesteps(pipe.scheduler, steps, device, sigmas=sigmas, mu=mu)
    n = len(timesteps)
    net_guidance = torch.full((1,), 1.0, device=device) if infusenet.config.guidance_embeds else None
    flux_guidance = torch.full((1,), guidance, device=device) if pipe.transformer.config.guidance_embeds else None
    for i, t in enumerate(timesteps):
        keep = 1.0 - float(i / n < start or (i + 1) / n > end)
        timestep = t.expand(1).to(latents.dtype) / 1000
        blocks, single = infusenet(hidden_states=latents, controlnet_cond=cond, conditioning_scale=scale * keep,
                                   timestep=timestep, guidance=net_guidance, pooled_projections=pooled,
                                   encoder_hidden_states=tokens, txt_ids=token_ids, img_ids=image_ids,
                                   return_dict=False)
        noise = pipe.transformer(hidden_states=latents, timestep=timestep, guidance=flux_guidance,
                                 pooled_projections=pooled, encoder_hidden_states=prompt_embeds,
                                 controlnet_block_samples=blocks, controlnet_single_block_samples=single,
                                 txt_ids=text_ids, img_ids=image_ids, return_dict=False)[0]
        latents = pipe.scheduler.step(noise, t, latents, return_dict=False)[0]
        report_step(i + 1, n)
    if output_type == "latent":
        return latents
    latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
    latents = latents / vae.config.scaling_factor + vae.config.shift_factor
    decoded = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
    return pipe.image_processor.postprocess(decoded, output_type="np")[0]


class InfiniteYouBackend:
    name: ClassVar[str] = "infiniteyou"
    families: ClassVar[tuple[str, ...]] = ("flux",)

    def generate(self, request: GenerationRequest, ctx: RunContext) -> Iterator[Candidate]:
        import torch

        started = time.perf_counter()
        options = SPEC.read(request)
        policy = InfiniteYouPolicy.from_options(options)
        embed_policy = embed_policy_of(options)
        flux.check_request(request, ctx)
        models = load_models(ctx, policy)
        found = emb.embed_identity(ctx, request.identity, FACE_SPACE, embed_policy)
        if found.dim != models.projection.proj_in.in_features:
            raise BadInput(f"model '{models.model_id}' projects {models.projection.proj_in.in_features}-d embeddings; "
                           f"the identity's are {found.dim}-d")
        tokens = id_tokens(models.projection, found.vectors)
        control, control_source = control_image(ctx, request, embed_policy, options.control_image)
        pipe = flux.load_flux_pipeline(ctx, request)
        # The door leaves ControlNets on the CPU under an offload strategy for the pipeline's
        # hooks; our loop calls the InfuseNet itself, so it is placed as the plan counts it
        # (with the transformer under model offload, block by block under group offload).
        from portrait.core.offload import place_module

        place_module(models.infusenet, ctx.placement)
        msl = flux.max_sequence_length(ctx)
        info = {"identity_mode": "zero-shot", "model": model_info(ctx),
                "adapter": {"id": models.model_id, "variant": policy.variant,
                            "infusenet_conditioning_scale": policy.scale,
                            "infusenet_guidance_start": policy.start, "infusenet_guidance_end": policy.end,
                            "id_tokens": int(tokens.shape[1])},
                "embedding": found.info(), "control_image": control_source, "max_sequence_length": msl}

        def render(seed: int) -> np.ndarray:
            with torch.inference_mode():
                image = denoise(pipe, models.infusenet, tokens, prompt=request.prompt, width=request.width,
                                height=request.height, steps=request.steps, guidance=request.guidance, seed=seed,
                                control=control, scale=policy.scale, start=policy.start, end=policy.end,
                                max_sequence_length=msl)
            return to_uint8(image)

        yield from seeded_candidates(request, render, setup_seconds=time.perf_counter() - started, info=info)


SPEC = BackendSpec(
    name="infiniteyou",
    families=("flux",),
    make=InfiniteYouBackend,
    help="InfiniteYou: InfuseNet residuals from the projected ArcFace embedding (FLUX, zero-shot)",
    options=InfiniteYouOptions,
    models=lambda o: ("base", VARIANTS[o.infiniteyou_variant], "face_pack_instantid", "arcface_infiniteyou"),
    license="InfiniteYou weights CC BY-NC 4.0; FLUX.1-dev non-commercial; antelopev2 non-commercial",
    # Faces found and aligned by antelopev2, embedded by facexlib's IR-SE50 (stages/embed.py), a
    # space no analyzer scores in: antelopev2's ArcFace is the nearest one we score with, so it is
    # the one kept out of the independent ranking.
    face_space=FACE_SPACE,
)
