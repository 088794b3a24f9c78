"""The one place that turns registry ids into loaded diffusers objects.

Real models and their make-tiny stand-ins go through the same functions: a diffusers
folder, an A1111 single-file checkpoint (loaded offline with `from_single_file` and a
config folder), or an explicit `--base PATH`. Loaded weights live in `ctx.cache`:

- `load_components` loads a base once (unet, vae, text encoders, tokenizers, scheduler);
- `load_pipeline` composes a pipeline class (txt2img / img2img / inpaint, with or without
  ControlNets) around those same modules, so switching kind never reloads weights. The
  pipelines share their modules: a LoRA or IP-Adapter loaded into one is seen by all of
  them, exactly as with diffusers' `from_pipe`;
- `load_controlnet`, `load_vae` load and cache one model each.

All three go through the model door (portrait.core.models: resolve, verify, cache under one key):
this module holds the door's "components", "vae" and "controlnet" builders (`build_*`), i.e. the
diffusers-specific part of turning files into modules.

Placement comes from `ctx.placement` under the request's memory plan (portrait.core.memplan):
fp32 on CPU, fp16/bf16 on CUDA (with the fp16-fix VAE the sdxl preset names); resident parts go
to the device as they load, and under an offload strategy they stay on the CPU until the
pipeline is built and `portrait.core.offload.apply` hooks them (model / group / sequential).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from . import models
from .errors import BadInput
from .archs.diffusers import (FAMILIES, PARTS, PICKLE_SUFFIXES, QUANTIZABLE, QUANTIZE, WEIGHT_SUFFIXES,  # noqa: F401
                             Components, build_components, build_controlnet, build_vae, family_parts,
                             quantize_flux, quantize_module, single_file_config, variant, weights_file)
from .modelspec import ResolvedModel

# `edit`: a picture from reference images and a prompt (FLUX.2 [klein]'s multi-reference
# conditioning, Qwen-Image-Edit-2511, FLUX.1 Kontext), the frontier backends' kind.
KINDS = ("txt2img", "img2img", "inpaint", "edit")

# diffusers pipeline class per (family, kind, with ControlNet)
_PIPELINES = {
    ("sd15", "txt2img", False): "StableDiffusionPipeline",
    ("sd15", "img2img", False): "StableDiffusionImg2ImgPipeline",
    ("sd15", "inpaint", False): "StableDiffusionInpaintPipeline",
    ("sd15", "txt2img", True): "StableDiffusionControlNetPipeline",
    ("sd15", "img2img", True): "StableDiffusionControlNetImg2ImgPipeline",
    ("sd15", "inpaint", True): "StableDiffusionControlNetInpaintPipeline",
    ("sdxl", "txt2img", False): "StableDiffusionXLPipeline",
    ("sdxl", "img2img", False): "StableDiffusionXLImg2ImgPipeline",
    ("sdxl", "inpaint", False): "StableDiffusionXLInpaintPipeline",
    ("sdxl", "txt2img", True): "StableDiffusionXLControlNetPipeline",
    ("sdxl", "img2img", True): "StableDiffusionXLControlNetImg2ImgPipeline",
    ("sdxl", "inpaint", True): "StableDiffusionXLControlNetInpaintPipeline",
    ("flux", "txt2img", False): "FluxPipeline",
    ("flux", "img2img", False): "FluxImg2ImgPipeline",
    ("flux", "inpaint", False): "FluxInpaintPipeline",
    ("flux", "txt2img", True): "FluxControlNetPipeline",
    ("flux", "img2img", True): "FluxControlNetImg2ImgPipeline",
    ("flux", "inpaint", True): "FluxControlNetInpaintPipeline",
    ("flux", "edit", False): "FluxKontextPipeline",  # FLUX.1 Kontext [dev] weights (same transformer layout)
    # FLUX.2 [klein]: one pipeline for text to image and single/multi-reference editing.
    ("flux2-klein", "txt2img", False): "Flux2KleinPipeline",
    ("flux2-klein", "edit", False): "Flux2KleinPipeline",
    ("flux2-klein", "inpaint", False): "Flux2KleinInpaintPipeline",
    ("zimage", "txt2img", False): "ZImagePipeline",
    ("zimage", "img2img", False): "ZImageImg2ImgPipeline",
    ("zimage", "inpaint", False): "ZImageInpaintPipeline",
    ("qwen-image-edit", "edit", False): "QwenImageEditPlusPipeline",  # 2509/2511: up to 3 references
}





# --- small helpers --------------------------------------------------------------------


def _family(ctx, resolved: ResolvedModel | None, family: str | None) -> str:
    chosen = family or (resolved.spec.family if resolved else None) or ctx.preset.family
    if chosen not in PARTS:
        raise BadInput(f"unknown model family '{chosen}' (expected {', '.join(FAMILIES)})")
    return chosen








# The door's checks, under the names this module has always had (tests and callers use them).
verified_file = models.verify
load_torch_file = models.read_weights


# --- config folders for single files -------------------------------------------------






# --- single models ----------------------------------------------------------------------


def load_vae(ctx, model_id: str, explicit: Path | None = None):
    """An AutoencoderKL, through the model door (kind "vae")."""
    return models.load(ctx, model_id, "vae", path=explicit)






def load_controlnet(ctx, model_id: str, explicit: Path | None = None):
    """A ControlNetModel (InstantID's IdentityNet too), through the model door (kind "controlnet")."""
    return models.load(ctx, model_id, "controlnet", path=explicit)




_friendly = models.friendly


# --- bases --------------------------------------------------------------------------------














def _default_vae_id(ctx, family: str) -> str | None:
    """The preset's VAE when it fits the base family (sd-vae-ft-mse, sdxl-vae-fp16-fix)."""
    vae_id = ctx.preset.models.get("vae")
    if not vae_id:
        return None
    spec = ctx.registry.get(vae_id)
    return vae_id if (spec.family or family) == family else None


def load_components(ctx, model_id: str | None = None, *, family: str | None = None, base_path: Path | str | None = None,
                    vae: str | None = "auto", dtypes: Mapping[str, str] | None = None) -> Components:
    """Load a base's modules once per (model, device, dtype, vae); cached in ctx.cache.

    `base_path` is an explicit file or folder (`--base PATH`): a single-file checkpoint
    (.safetensors, or a pickle .ckpt) or a diffusers folder. `vae="auto"` swaps in the
    preset's VAE role; None keeps the base's own; any other value is a registry id.
    """
    model_id = model_id or ctx.preset.model("base")
    explicit = Path(base_path) if base_path else None
    resolved = models.resolve(ctx, model_id, explicit)
    fam = _family(ctx, resolved, family)
    vae_id = _default_vae_id(ctx, fam) if vae == "auto" else vae
    quantize = quantize_parts(ctx, fam)
    extra: dict[str, Any] = {"quantize": tuple(sorted(quantize.items()))} if quantize else {}
    if dtypes:
        extra["dtypes"] = dict(dtypes)
    return models.load(ctx, model_id, "components", path=explicit, family=fam, vae=vae_id, requested=model_id, **extra)


def quantize_parts(ctx, family: str) -> dict[str, str]:
    """Part -> optimum-quanto scheme for a base: the memory plan's choice when the run has one
    (portrait.core.memplan: runtime.quantize, or the largest part quantized to fit), else the
    preset's runtime.quantize on the DiT and its big text encoder (FLUX.1: T5, as InfiniteYou's
    --quantize_8bit; the frontier bases: their Qwen encoder)."""
    plan = getattr(ctx, "plan", None)
    if plan is not None:
        return {k: v for k, v in plan.quantize.items() if k in PARTS.get(family, ())}
    scheme = str(ctx.preset.section("runtime").get("quantize", "none")) if family in QUANTIZABLE else "none"
    encoder = "text_encoder_2" if "text_encoder_2" in PARTS.get(family, ()) else "text_encoder"
    return {name: scheme for name in ("transformer", encoder)} if scheme != "none" else {}




def _build(cls, components: Components, extra: Mapping[str, Any]):
    """Instantiate `cls` from shared modules, passing only what its constructor takes."""
    accepted = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in components.modules.items() if k in accepted}
    # Each pipeline gets its own scheduler object: schedulers keep per-call state (timesteps).
    kwargs["scheduler"] = kwargs["scheduler"].__class__.from_config(kwargs["scheduler"].config)
    defaults = {"safety_checker": None, "feature_extractor": None, "image_encoder": None,
                "requires_safety_checker": False, "add_watermarker": False}
    for name, value in defaults.items():
        if name in accepted and name not in kwargs:
            kwargs[name] = value
    kwargs.update({k: v for k, v in components.config.items() if k in accepted})
    kwargs.update({k: v for k, v in extra.items() if k in accepted})
    return cls(**kwargs)


def load_pipeline(ctx, model_id: str | None = None, kind: str = "txt2img", controlnets: Iterable[str] = (), *,
                  family: str | None = None, base_path: Path | str | None = None, vae: str | None = "auto",
                  vae_slicing: bool = False, vae_tiling: bool = False, scheduler: str | None = None,
                  dtypes: Mapping[str, str] | None = None):
    """A ready diffusers pipeline for `kind` (txt2img | img2img | inpaint), with ControlNets.

    Built around `load_components` so kinds and ControlNet sets share one copy of the base
    weights; the pipeline itself is kept with those components per (kind, ControlNets). `scheduler`
    names a sampler (see SCHEDULERS); None keeps the model's own. `dtypes`: parts loaded in a
    dtype of their own (see load_components).
    """
    import diffusers

    if kind not in KINDS:
        raise BadInput(f"unknown pipeline kind '{kind}' (expected one of {', '.join(KINDS)})")
    controlnets = tuple(controlnets)
    components = load_components(ctx, model_id, family=family, base_path=base_path, vae=vae, dtypes=dtypes)
    model_id = components.model_id
    key = (components.family, kind, bool(controlnets))
    if key not in _PIPELINES:
        what = f"{kind} with ControlNets" if controlnets else kind
        raise BadInput(f"base '{components.model_id}' ({components.family}) has no {what} pipeline")
    cls = getattr(diffusers, _PIPELINES[key])

    def factory():
        extra: dict[str, Any] = {}
        if controlnets:
            nets = [load_controlnet(ctx, cid) for cid in controlnets]
            for cid, net in zip(controlnets, nets):
                _check_controlnet_fits(cid, net, components)
            extra["controlnet"] = nets[0] if len(nets) == 1 else nets
        pipe = _build(cls, components, extra)
        if ctx.placement.offload:
            from .offload import apply

            apply(pipe, ctx.placement)  # the memory plan's strategy (model / group / sequential offload)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    pipe = components.pipeline((kind, controlnets), _friendly(factory, model_id))
    if vae_slicing:
        pipe.vae.enable_slicing()
    if vae_tiling:
        pipe.vae.enable_tiling()
    if scheduler:
        set_scheduler(pipe, scheduler)
    return pipe


def _check_controlnet_fits(controlnet_id: str, net, components: Components) -> None:
    """A ControlNet for the other family fails deep inside the UNet; say so up front."""
    if components.family == "flux":
        if "unet" in components.modules or getattr(net.config, "joint_attention_dim", None) != \
                components["transformer"].config.joint_attention_dim:
            raise BadInput(f"ControlNet '{controlnet_id}' does not fit base '{components.model_id}' (flux)")
        return
    if not hasattr(net.config, "cross_attention_dim"):
        raise BadInput(f"ControlNet '{controlnet_id}' is a FLUX ControlNet; base '{components.model_id}' is "
                       f"{components.family}")
    unet = components["unet"]
    if net.config.cross_attention_dim != unet.config.cross_attention_dim or \
            tuple(net.config.block_out_channels) != tuple(unet.config.block_out_channels):
        raise BadInput(f"ControlNet '{controlnet_id}' does not fit base '{components.model_id}' "
                       f"({components.family}): use a ControlNet of the same family")


# --- schedulers -----------------------------------------------------------------------------


# The sampler table is its own leaf module (core/schedulers.py): the request declaration reads its
# names without importing the loaders.
from .schedulers import SCHEDULERS, SchedulerChoice  # noqa: E402,F401


def make_scheduler(name: str, config: Mapping[str, Any]):
    """A diffusers scheduler for a sampler name, from a model's scheduler config."""
    import diffusers

    choice = SCHEDULERS.get(name)
    if choice is None:
        raise BadInput(f"unknown sampler '{name}' (known: {', '.join(SCHEDULERS)})")
    # Karras sigmas are an Euler/DPM option; other classes ignore unknown keys, but a stale
    # `use_karras_sigmas` from the base config must not leak into a plain choice.
    base = {k: v for k, v in dict(config).items() if k not in ("use_karras_sigmas", "algorithm_type")}
    return getattr(diffusers, choice.cls).from_config({**base, **choice.options})


def set_scheduler(pipe, name: str):
    pipe.scheduler = make_scheduler(name, pipe.scheduler.config)
    return pipe


def sampler_label(name: str) -> tuple[str, str]:
    """(Sampler, Schedule type) as A1111 writes them, e.g. ("DPM++ 2M", "Karras")."""
    choice = SCHEDULERS.get(name)
    if choice is None:
        raise BadInput(f"unknown sampler '{name}' (known: {', '.join(SCHEDULERS)})")
    return choice.a1111, choice.schedule
