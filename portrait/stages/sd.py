"""What the Stable Diffusion backends share: pipelines by kind, schedulers, memory
options, ControlNet arguments, seeded calls and the model facts recorded in outputs.

Pipelines come from portrait.core.loaders (registry ids -> diffusers objects, cached in
ctx.cache); this module only decides which one a request needs and how to call it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from portrait.core.context import RunContext
from portrait.core.errors import BadInput
from portrait.core.steps import step_callback
from portrait.core.types import GenerationRequest

# control name -> preset model role. The color control is the tile ControlNet fed a mosaic.
CONTROL_ROLES = {"canny": "controlnet_canny", "openpose": "controlnet_openpose", "depth": "controlnet_depth",
                 "tile": "controlnet_tile", "color": "controlnet_tile"}
# Above this many pixels per image, VAE tiling is switched on under `auto` on CUDA.
TILING_PIXELS = 1536 * 1536

def controlnet_ids(ctx: RunContext, names: Sequence[str]) -> tuple[str, ...]:
    unknown = [n for n in names if n not in CONTROL_ROLES]
    if unknown:
        raise BadInput(f"unknown control(s) {', '.join(unknown)} (known: {', '.join(CONTROL_ROLES)})")
    return tuple(ctx.preset.model(CONTROL_ROLES[n]) for n in names)


def load_sd_pipeline(ctx: RunContext, kind: str, controlnets: tuple[str, ...] = (), role: str = "base",
                     keep_adapter: bool = False):
    """The preset's base pipeline of `kind` (txt2img | img2img | inpaint) with ControlNets.

    An IP-Adapter attached by an earlier request stays on the shared UNet while the pipeline is
    cached (attached once per loaded pipeline: stages/zeroshot.attached_ip_adapter); a caller
    that runs without one (`keep_adapter=False`) gets the UNet without it."""
    from portrait.core.loaders import load_pipeline

    pipe = load_pipeline(ctx, ctx.preset.model(role), kind=kind, controlnets=controlnets)
    if not keep_adapter:
        detach_ip_adapter(pipe)
    return pipe


IP_ADAPTER_MARK = "_portrait_ip_adapter"  # on the UNet: which adapter checkpoint is attached
FACEID_LORA_ADAPTER = "faceid_0"  # the name diffusers gives the first IP-Adapter's LoRA


def attached_adapter(pipe) -> Any:
    """The key of the IP-Adapter attached to the pipeline's UNet, None when there is none."""
    unet = getattr(pipe, "unet", None)
    return getattr(unet, IP_ADAPTER_MARK, None) if unet is not None else None


def detach_ip_adapter(pipe) -> None:
    """Unload an attached IP-Adapter (and FaceID's LoRA) from the pipeline's UNet."""
    unet = getattr(pipe, "unet", None)
    if unet is None or getattr(unet, IP_ADAPTER_MARK, None) is None:
        return
    pipe.unload_ip_adapter()
    if FACEID_LORA_ADAPTER in (getattr(unet, "peft_config", {}) or {}):
        pipe.delete_adapters([FACEID_LORA_ADAPTER])
    setattr(unet, IP_ADAPTER_MARK, None)


def prepare_pipeline(pipe, request: GenerationRequest, ctx: RunContext) -> None:
    """Scheduler and memory options for this request (the pipeline may be shared: set both)."""
    from portrait.core.loaders import make_scheduler

    from portrait.core.loaders import SCHEDULERS

    choice = SCHEDULERS.get(request.scheduler)
    if choice is not None and ctx.preset.family not in choice.families:
        raise BadInput(f"--scheduler {request.scheduler}: a sampler for {', '.join(choice.families)}, not "
                       f"{ctx.preset.family} (preset '{ctx.preset.name}')")
    pipe.scheduler = make_scheduler(request.scheduler, pipe.scheduler.config)
    memory = request.resolved.memory
    big = request.width * request.height >= TILING_PIXELS
    _toggle(pipe.vae, "tiling", _decide(memory.get("vae_tiling", "auto"), ctx.placement.is_cuda and big))
    _toggle(pipe.vae, "slicing", _decide(memory.get("vae_slicing", "auto"), ctx.placement.is_cuda and big))
    # Offload is the request's memory plan (stages/planning.py), applied when the pipeline was
    # built (core/offload.py): nothing is decided here after loading.
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)


def _decide(setting: Any, auto: bool) -> bool:
    if setting in (True, "true", "on", 1):
        return True
    if setting in (False, "false", "off", 0):
        return False
    return auto


def _toggle(vae, what: str, on: bool) -> None:
    method = getattr(vae, f"{'enable' if on else 'disable'}_{what}", None)
    if method is not None:
        method()


def control_kwargs(controls: Sequence[Any], key: str = "image") -> dict[str, Any]:
    """The ControlNet arguments of a pipeline call; a single ControlNet takes scalars.

    `key` is where the pipeline wants the maps: `image` for txt2img, `control_image` for
    the img2img and inpaint ControlNet pipelines (whose `image` is the init image).
    """
    from PIL import Image

    if not controls:
        return {}
    images = [Image.fromarray(c.image) for c in controls]
    if len(controls) == 1:
        c = controls[0]
        return {key: images[0],
                "controlnet_conditioning_scale": float(c.strength),
                "control_guidance_start": float(c.start), "control_guidance_end": float(c.end)}
    return {key: images, "controlnet_conditioning_scale": [float(c.strength) for c in controls],
            "control_guidance_start": [float(c.start) for c in controls],
            "control_guidance_end": [float(c.end) for c in controls]}


def generator(seed: int):
    """A CPU generator: the same seed gives the same noise on CPU and CUDA."""
    import torch

    return torch.Generator(device="cpu").manual_seed(int(seed))


def call_pipeline(pipe, request: GenerationRequest, seed: int, **kwargs: Any) -> np.ndarray:
    """One seeded pipeline call -> HxWx3 uint8 RGB."""
    return _call(pipe, request, generator(seed), {}, kwargs)[0]


def call_pipeline_batch(pipe, request: GenerationRequest, seeds: Sequence[int], **kwargs: Any) -> list[np.ndarray]:
    """One pipeline call for several seeds -> one HxWx3 uint8 image per seed.

    Each seed gets its own generator, and diffusers draws each image's starting noise (and any
    per-step noise) from its image's generator, so an image equals its single-seed render within
    floating-point tolerance (the batched convolutions sum in another order) and a seed still
    reproduces one image alone.
    """
    if len(seeds) == 1:
        return [call_pipeline(pipe, request, seeds[0], **kwargs)]
    return _call(pipe, request, [generator(s) for s in seeds], {"num_images_per_prompt": len(seeds)}, kwargs)


def _call(pipe, request: GenerationRequest, gen: Any, batch: Mapping[str, Any], kwargs: Mapping[str, Any]):
    import torch

    args: dict[str, Any] = {
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt or None,
        "num_inference_steps": request.steps,
        "guidance_scale": request.guidance,
        "generator": gen,
        "output_type": "np",
        **batch,
    }
    if "width" not in kwargs and "mask_image" not in kwargs and "strength" not in kwargs:
        args.update(width=request.width, height=request.height)
    args.update(kwargs)
    args.update(step_callback(pipe, args))  # each step reported to the flow's hook (progress, cancel)
    with torch.inference_mode():
        out = pipe(**args)
    return [to_uint8(image) for image in out.images]


# Peak memory one more candidate in a batch adds, at the family's native size, with CFG's
# doubled batch and the VAE decode. Estimates from diffusers' published memory figures
# (SD1.5 512 px fp16 ~0.7 GB/image, SDXL 1024 px ~2.5 GB/image); doubled in fp32 (CPU).
PER_IMAGE_GB = {"sd15": (0.7, 512), "sdxl": (2.5, 1024)}
MAX_BATCH = 8


def candidate_batch_size(ctx: RunContext, request: GenerationRequest) -> int:
    """How many candidates one pipeline call renders: what half the free memory holds.

    `generate.memory.batch` in the preset (or options) forces a number; `auto` (the default)
    reads free VRAM on CUDA and available RAM on CPU. Offloaded pipelines render one at a time.
    """
    setting = request.resolved.memory.get("batch", "auto")
    if setting != "auto":
        if isinstance(setting, bool) or not isinstance(setting, int) or setting < 1:
            raise BadInput(f"generate.memory.batch '{setting}': use auto or a whole number of at least 1")
        return max(1, min(int(setting), request.n))
    if request.n <= 1 or ctx.placement.offload:
        return 1
    if ctx.placement.is_cuda and getattr(ctx, "plan", None) is not None:
        return max(1, min(request.n, MAX_BATCH, ctx.plan.max_batch))  # what the plan's headroom holds
    gb, native = PER_IMAGE_GB.get(ctx.preset.family, PER_IMAGE_GB["sd15"])
    per_image = gb * request.width * request.height / native**2
    if ctx.placement.is_cuda:
        from portrait.core.memplan import device_budget

        free = device_budget(ctx.placement.device).free / 2**30
    else:
        free, per_image = _available_ram_gb(), per_image * 2
    return max(1, min(request.n, MAX_BATCH, int(0.5 * free / max(per_image, 1e-3))))


def _available_ram_gb() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 4.0  # not Linux: assume a modest machine


def to_uint8(image: np.ndarray) -> np.ndarray:
    return (np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0) * 255.0).round().astype(np.uint8)


def model_info(ctx: RunContext, role: str = "base") -> dict[str, Any]:
    """What A1111's `Model` and `Model hash` need: a display name and the file to hash."""
    model_id = ctx.preset.model(role)
    resolved = ctx.resolve(model_id)
    spec = resolved.spec
    path = resolved.path
    if path.is_file():
        return {"id": model_id, "name": path.stem, "file": str(path), "sha256": spec.sha256.get(path.name)}
    # A diffusers folder has no single checkpoint; its UNet (FLUX: transformer) weights identify it.
    part = "transformer" if (Path(resolved.root) / "transformer").is_dir() else "unet"
    unet = sorted(Path(resolved.root, part).glob("diffusion_pytorch_model*.safetensors"))
    file = unet[0] if unet else None
    known = spec.sha256.get(f"{part}/{file.name}") if file else None
    return {"id": model_id, "name": spec.id if spec.source == "tiny" else (spec.repo or spec.id).split("/")[-1],
            "file": str(file) if file else None, "sha256": known}
