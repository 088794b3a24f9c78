"""Backend `pulid` (SDXL): PuLID v1.1, an ID encoder whose tokens enter the UNet through
its own cross-attention branch (`id_scale`), with no IdentityNet and no LoRA of its own.

Per photo of the identity (best first, `id_photos`, default 4 as the reference demo's one
main + three supporting photos): the antelopev2 raw embedding (stages/embed.py) and
EVA02-CLIP-L-14-336 features of the face, aligned to facexlib's 512 FFHQ template, with
the background, ears, neck, clothes and hat painted white by the face parser and the rest
turned gray (as PuLID feeds EVA). The ID vector [arcface 512 ++ unit EVA embedding 768]
and the five EVA hidden states go into the IDFormer (portrait.core.archs.pulid), which
gives 32 ID tokens; the unconditional tokens are the IDFormer on zeros. Several photos
are read together (`id_mode=all`, the reference's way: their tokens side by side), or
averaged (`mean`), or the best one alone (`best`).

Modes (`pulid_mode`): `fidelity` (8 zero tokens, orthogonal v2) and `style` (16 zero
tokens, orthogonal v1), the two modes of the reference demo; `plain` adds the ID attention
as is (v1.1's default with num_zero 0, ortho off). `pulid_num_zero` / `pulid_ortho` override.

Schedules (`pulid_schedule`):
- `karras` (v1.1 reference, default): DPM-Solver++(2M) in k-diffusion's sigma space over
  Karras sigmas of the SD discrete schedule, each step the UNet at the nearest discrete
  timestep on x / sqrt(sigma^2 + 1), CFG from uncond (negative text + zero-ID tokens) and cond.
  The loop is written here (about 20 lines) because the reference samples exactly this
  way, and diffusers' DPMSolverMultistepScheduler starts from the noise in VP space (x_T =
  noise instead of noise * sigma_max / sqrt(sigma_max^2 + 1)), which is a different image.
- `lightning`: the stock diffusers SDXL pipeline with DPMSolverMultistepScheduler on
  `timestep_spacing="trailing"`, PuLID v1's recipe for SDXL-Lightning bases (4 steps,
  guidance 1.2); the ID processors read the tokens laid out like the pipeline's text batch.

Options: id_scale (0.8), pulid_mode, pulid_num_zero, pulid_ortho, pulid_schedule,
id_mode all|mean|best, id_photos, face_locator, face_pack.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Literal

import numpy as np

from pydantic import Field

from portrait.core.backend import BackendSpec
from portrait.core.context import RunContext
from portrait.core.errors import BadInput
from portrait.core.options import CommonOptions, EmbedOptions
from portrait.core.types import Candidate, GenerationRequest
from portrait.stages.pulid_features import FACE_SPACE, pulid_inputs
from portrait.stages import loras
from portrait.stages.identity_inputs import embed_policy_of
from portrait.stages.sd import load_sd_pipeline, model_info, prepare_pipeline, to_uint8
from portrait.stages.seeding import seeded_candidates

if TYPE_CHECKING:  # the table imports this module for `generate --help`: torch loads inside generate
    from portrait.core.archs import pulid as arch

# PuLID's two modes as its demo (app.py) sets them (zero tokens, orthogonal projection); v1.1's
# demo exposes both knobs directly, `plain` is its setting with neither.
MODES = {"fidelity": (8, "v2"), "style": (16, "v1"), "plain": (0, "off")}

class PuLIDOptions(CommonOptions, EmbedOptions):
    """PuLID's options (defaults as in the reference demos)."""

    id_mode: Literal["mean", "all", "best"] = Field("all", description="all: the photos' tokens side by side "
                                                                       "(the reference's way); mean; best")
    id_photos: int = Field(4, ge=1, le=64, description="the bundle's best photos (the demo takes 1 + 3 supporting)")
    id_scale: float = Field(0.8, ge=0.0, le=5.0, description="weight of the ID attention")
    pulid_mode: Literal["fidelity", "style", "plain"] = Field(
        "fidelity", description="fidelity: 8 zero tokens + ortho v2; style: 16 + ortho v1; plain: neither")
    pulid_num_zero: int | None = Field(None, ge=0, le=64, description="zero tokens appended (overrides the mode)")
    pulid_ortho: Literal["off", "v1", "v2"] | None = Field(None, description="orthogonal projection (overrides the mode)")
    pulid_schedule: Literal["karras", "lightning"] = Field(
        "karras", description="karras: v1.1's DPM++ 2M Karras; lightning: trailing DPM++ for SDXL-Lightning bases")


@dataclass(frozen=True)
class PuLIDPolicy:
    id_scale: float = 0.8  # the reference demos' default
    num_zero: int = 8
    ortho: str = "v2"
    mode_name: str = "fidelity"
    schedule: str = "karras"

    @classmethod
    def from_options(cls, options: PuLIDOptions) -> "PuLIDPolicy":
        """From the backend's typed options: the mode's settings, each overridable."""
        num_zero, ortho = MODES[options.pulid_mode]
        return cls(id_scale=options.id_scale, num_zero=num_zero if options.pulid_num_zero is None
                   else options.pulid_num_zero, ortho=options.pulid_ortho or ortho, mode_name=options.pulid_mode,
                   schedule=options.pulid_schedule)

    @property
    def mode(self) -> "arch.IDMode":
        from portrait.core.archs.pulid import IDMode

        return IDMode(num_zero=self.num_zero, ortho=self.ortho)


@dataclass(frozen=True)
class PuLIDModels:
    model_id: str
    encoder: Any  # arch.IDFormer
    layers: dict  # processor index -> {id_to_k.weight, id_to_v.weight}
    eva_id: str
    eva: Any  # arch.EvaVisual


def load_models(ctx: RunContext) -> PuLIDModels:
    """The preset's PuLID checkpoint and EVA-CLIP through the model door (kinds "pulid", "eva-clip")."""
    from portrait.core.models import load

    pulid_id, eva_id = ctx.preset.model("pulid"), ctx.preset.model("eva_clip")
    encoder, layers = load(ctx, pulid_id, "pulid")
    return PuLIDModels(pulid_id, encoder, layers, eva_id, load(ctx, eva_id, "eva-clip"))


# --- the UNet's ID attention ---------------------------------------------------------------------------------


@contextlib.contextmanager
def attached_pulid(unet, layers: dict, policy: PuLIDPolicy) -> Iterator["arch.IDState"]:
    """PuLID's processors on `unet` for one block (its own processors come back after)."""
    from portrait.core.archs import pulid as arch

    state = arch.IDState()
    state.scale, state.mode = policy.id_scale, policy.mode
    before = unet.attn_processors
    try:
        procs = arch.id_processors(unet, layers, state)
    except ValueError as exc:
        raise BadInput(f"the PuLID checkpoint does not fit this SDXL UNet: {exc}") from None
    unet.set_attn_processor(procs)
    try:
        yield state
    finally:
        unet.set_attn_processor(before)


def batch_tokens(uncond, cond, batch: int):
    """[batch, Q, C] laid out as the UNet batch: uncond rows then cond rows under CFG."""
    import torch

    if batch % 2 == 0 and batch >= 2:
        half = batch // 2
        return torch.cat([uncond.expand(half, -1, -1), cond.expand(half, -1, -1)])
    return cond.expand(batch, -1, -1)


# --- sampling (the karras schedule) ------------------------------------------------------------------------------


class KarrasDenoiser:
    """The SD discrete schedule in k-diffusion's sigma space (eps prediction)."""

    def __init__(self, scheduler_config: dict):
        import torch

        start, end = float(scheduler_config.get("beta_start", 0.00085)), float(scheduler_config.get("beta_end", 0.012))
        steps = int(scheduler_config.get("num_train_timesteps", 1000))
        betas = torch.linspace(start ** 0.5, end ** 0.5, steps, dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0).float()
        self.sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        self.log_sigmas = self.sigmas.log()

    def karras(self, n: int, rho: float = 7.0):
        import torch

        ramp = torch.linspace(0, 1, n)
        lo, hi = self.sigmas[0] ** (1 / rho), self.sigmas[-1] ** (1 / rho)
        sigmas = (hi + ramp * (lo - hi)) ** rho
        return torch.cat([sigmas, sigmas.new_zeros([1])])

    def timestep(self, sigma):
        return (sigma.log().to(self.log_sigmas.device) - self.log_sigmas[:, None]).abs().argmin(dim=0).view(
            sigma.shape).to(sigma.device)


def sample_karras(unet, denoiser: KarrasDenoiser, noise, steps: int, guidance: float, text: dict, state, tokens):
    """DPM-Solver++(2M) over Karras sigmas with CFG; `text` holds the UNet's conditioning batched
    [negative, positive]; `tokens` (uncond, cond) go to the ID processors the same way."""
    import torch

    sigmas = denoiser.karras(steps).to(noise.device)
    x = noise * sigmas[0].to(noise)
    if state is not None:
        state.tokens = batch_tokens(*tokens, 2 * x.shape[0])

    def denoised(x, sigma):
        scaled = x / (sigma ** 2 + 1) ** 0.5
        t = denoiser.timestep(sigma.reshape(1)).expand(2 * x.shape[0])
        eps = unet(torch.cat([scaled, scaled]), t, return_dict=False, **text)[0]
        negative, positive = eps.chunk(2)
        return x - (negative + guidance * (positive - negative)) * sigma

    old = None
    for i in range(len(sigmas) - 1):
        d = denoised(x, sigmas[i])
        t, t_next = -sigmas[i].log(), -sigmas[i + 1].log()
        h = t_next - t
        if old is None or sigmas[i + 1] == 0:
            x = (sigmas[i + 1] / sigmas[i]) * x - (-h).expm1() * d
        else:
            r = (t - (-sigmas[i - 1].log())) / h
            x = (sigmas[i + 1] / sigmas[i]) * x - (-h).expm1() * ((1 + 1 / (2 * r)) * d - (1 / (2 * r)) * old)
        old = d
    return x


def render_karras(pipe, prompt: str, negative: str, width: int, height: int, steps: int, guidance: float, seed: int,
                  state=None, tokens=None, decode: bool = True):
    """One PuLID v1.1 render on an SDXL pipeline's parts -> latents (decode=False) or HxWx3 uint8."""
    import torch

    unet = pipe.unet
    device, dtype = pipe._execution_device, unet.dtype  # under model CPU offload the UNet's weights sit on the CPU
    with torch.inference_mode():
        noise = torch.randn((1, unet.config.in_channels, height // pipe.vae_scale_factor,
                             width // pipe.vae_scale_factor), generator=torch.Generator().manual_seed(int(seed)))
        noise = noise.to(device=device, dtype=dtype)
        pos, neg, pos_pooled, neg_pooled = pipe.encode_prompt(prompt=prompt, negative_prompt=negative, device=device)
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=dtype, device=device)
        text = {"encoder_hidden_states": torch.cat([neg, pos]).to(dtype),
                "added_cond_kwargs": {"text_embeds": torch.cat([neg_pooled, pos_pooled]).to(dtype),
                                      "time_ids": torch.cat([time_ids, time_ids])}}
        latents = sample_karras(unet, KarrasDenoiser(dict(pipe.scheduler.config)), noise, steps, guidance, text,
                                state, tokens)
        if state is not None:
            state.tokens = None
        if not decode:
            return latents
        vae = pipe.vae
        image = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        return to_uint8(pipe.image_processor.postprocess(image, output_type="np")[0])


def render_lightning(pipe, request: GenerationRequest, seed: int, state, tokens) -> np.ndarray:
    """PuLID v1's SDXL-Lightning recipe: the stock pipeline, trailing DPM-Solver++ steps."""
    from diffusers import DPMSolverMultistepScheduler

    from portrait.stages.sd import call_pipeline

    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    uncond, cond = tokens
    rows = 2 if request.guidance > 1.0 else 1  # diffusers runs CFG only above guidance 1
    state.tokens = batch_tokens(uncond, cond, rows)
    try:
        return call_pipeline(pipe, request, seed)
    finally:
        state.tokens = None


# --- the backend ----------------------------------------------------------------------------------------------------


class PuLIDBackend:
    def generate(self, request: GenerationRequest, ctx: RunContext) -> Iterator[Candidate]:
        started = time.perf_counter()
        options = SPEC.read(request)
        policy = PuLIDPolicy.from_options(options)
        embed_policy = embed_policy_of(options)
        models = load_models(ctx)
        inputs = pulid_inputs(ctx, request.identity, models, embed_policy)
        pipe = load_sd_pipeline(ctx, "txt2img")
        identity_lora = loras.identity_use(request.identity, "sdxl", request.lora_weight)
        stack = [identity_lora] if identity_lora else []
        loras.attach(pipe, stack)
        prepare_pipeline(pipe, request, ctx)
        info = {
            "identity_mode": "zero-shot+lora" if identity_lora else "zero-shot",
            "adapter": {"id": models.model_id, "eva_clip": models.eva_id, "id_scale": policy.id_scale,
                        "mode": policy.mode_name, "num_zero": policy.num_zero, "ortho": policy.ortho,
                        "schedule": policy.schedule,
                        "sampler": "DPM++ 2M Karras (k-diffusion sigmas)" if policy.schedule == "karras"
                        else "DPM++ 2M trailing (SDXL-Lightning)"},
            "embedding": inputs.embedding.info(),
            "model": model_info(ctx),
            "loras": [u.as_info() for u in stack],
        }
        if identity_lora is None:
            info["note"] = "no sdxl LoRA in the bundle: ran zero-shot"
        if request.controls:
            info["note_controls"] = "pulid ignores the template's ControlNets (PuLID needs none)"
        setup = time.perf_counter() - started
        tokens = (inputs.uncond, inputs.cond)
        with attached_pulid(pipe.unet, models.layers, policy) as state:
            with loras.composed(pipe, stack, "merge"):

                def render(seed: int) -> np.ndarray:
                    if policy.schedule == "lightning":
                        return render_lightning(pipe, request, seed, state, tokens)
                    return render_karras(pipe, request.prompt, request.negative_prompt, request.width,
                                         request.height, request.steps, request.guidance, seed, state, tokens)

                yield from seeded_candidates(request, render, setup_seconds=setup, info=info)


SPEC = BackendSpec(
    name="pulid",
    families=("sdxl",),
    make=PuLIDBackend,
    help="PuLID v1.1: ID tokens through its own cross-attention (SDXL, zero-shot; fidelity/style modes)",
    options=PuLIDOptions,
    models=("pulid", "eva_clip", "face_pack_instantid", "face_parser"),
    license="PuLID weights Apache-2.0, conditioned on insightface antelopev2 (non-commercial); EVA-CLIP MIT",
    face_space=FACE_SPACE,  # the PuLID encoder's (stages/pulid_features.py)
)
