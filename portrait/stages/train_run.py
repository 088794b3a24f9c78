"""The training run's parts both loops share, and the UNet loop's step.

Setup (LoRA configs and adapters, precision, optimizer), the caches (latents per photo and
mirror, prompt embeddings), where idle modules live (`Residency`), the step's draws (a pure
function of (seed, step)), one UNet step with the DDPM loss (`setup_training`, `step_loss`) and
the optimizer step. stages/train_flow.py builds the flow-matching step on the same parts, and
stages/train.py runs the loop around either (docs/ARCHITECTURE.md#training-loops).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from portrait.core.device import cpu_bf16_native
from portrait.core.errors import BadInput, PortraitError
from portrait.core.formats.lora import TEXT_COMPONENTS
from portrait.stages.train_state import TrainEvent
from portrait.stages.train_types import (FLOW_LOOP, UNET_LOOP, TrainData, TrainModels, TrainPolicy,
                                         check_trainable)


# --- setup ----------------------------------------------------------------------------


def denoiser_targets(policy: TrainPolicy, family: str) -> tuple[str, ...]:
    """The denoiser modules that get a LoRA: the UNet's from the policy, a transformer's from the
    policy or else the family's reference script's default."""
    if check_trainable(family) == UNET_LOOP:
        return tuple(policy.unet_targets)
    if policy.transformer_targets:
        return tuple(policy.transformer_targets)
    from portrait.core.formats.lora import TRANSFORMER_TARGETS

    return TRANSFORMER_TARGETS[family]


def lora_configs(policy: TrainPolicy, models: TrainModels) -> dict[str, Any]:
    """One peft LoraConfig per trained component (gaussian init as in diffusers' scripts)."""
    from peft import LoraConfig

    configs = {
        models.denoiser_name: LoraConfig(r=policy.rank, lora_alpha=policy.alpha, init_lora_weights="gaussian",
                                         target_modules=list(denoiser_targets(policy, models.family)))
    }
    if policy.train_text_encoder:
        for name, _tok, _enc in models.text_encoders():
            configs[name] = LoraConfig(r=policy.rank, lora_alpha=policy.alpha, init_lora_weights="gaussian",
                                       target_modules=list(policy.text_targets))
    return configs


def trained_modules(models: TrainModels, names: Iterable[str]) -> dict[str, Any]:
    return {name: getattr(models.pipeline, name) for name in names}


def add_adapters(models: TrainModels, configs: Mapping[str, Any], seed: int) -> None:
    import torch

    if getattr(models.denoiser, "peft_config", None):
        raise PortraitError(f"the base {models.denoiser_name} already carries a LoRA adapter; give the trainer a fresh "
                            "pipeline")
    # peft draws the initial LoRA A matrices from the global RNG; seed it so runs repeat.
    torch.manual_seed(seed)
    for name, config in configs.items():
        getattr(models.pipeline, name).add_adapter(config)


def mixed_precision_for(policy: TrainPolicy, device: str, dtype_name: str, unet_dtype: Any = None) -> str:
    """fp16/bf16 per the placement on CUDA; on CPU, `auto` is bf16 where the CPU does bf16 in
    hardware (a step in half the time, the frozen weights in half the memory: see
    core.device.cpu_bf16_native) and fp32 elsewhere. fp16 matmuls on CPU are slow or unsupported.
    The LoRA weights and their optimizer state stay fp32 in every mode (diffusers does the same).

    `unet_dtype`: the dtype of a UNet already loaded. On CPU `auto` then follows it: the train
    flow loads the UNet as bf16 when it will train in bf16 (load_dtypes), while an fp32 pipeline
    a caller hands in is not rounded to bf16 in place under `auto` (only an explicit bf16 does that).
    """
    if not device.startswith("cuda"):
        if policy.mixed_precision == "fp16":
            raise BadInput("--mixed-precision fp16: needs a CUDA device; on CPU use bf16 or no")
        if policy.mixed_precision == "auto":
            if unet_dtype is not None:
                return "bf16" if str(unet_dtype) == "torch.bfloat16" else "no"
            return "bf16" if cpu_bf16_native() else "no"
        return policy.mixed_precision
    if policy.mixed_precision != "auto":
        return policy.mixed_precision
    return {"float16": "fp16", "bfloat16": "bf16"}.get(dtype_name, "no")


def load_dtypes(policy: TrainPolicy, device: str, dtype_name: str) -> dict[str, str]:
    """The parts the trainer wants loaded in a dtype other than the placement's: on CPU under
    bf16 the UNet and text encoders come off disk as bf16 (never held in fp32 first); the VAE
    encodes in fp32. On CUDA the pipeline already loads in the placement's fp16/bf16."""
    if device.startswith("cuda") or mixed_precision_for(policy, device, dtype_name) != "bf16":
        return {}
    return {"unet": "bfloat16", "transformer": "bfloat16", "text_encoder": "bfloat16", "text_encoder_2": "bfloat16"}


def gradient_checkpointing_for(policy: TrainPolicy, device: str) -> bool:
    """Checkpointing trades a second forward for activation memory: on only where memory needs it.

    `auto` switches it on for CUDA devices under 16 GB (SD1.5 at 512 px trains in about 7 GB
    without it in fp16, SDXL at 1024 px does not fit 16 GB without it); on CPU the RAM is there
    and the extra forward would cost about 40% of a step.
    """
    if policy.gradient_checkpointing != "auto":
        return bool(policy.gradient_checkpointing)
    if not device.startswith("cuda"):
        return False
    import torch

    index = torch.device(device).index or 0
    return torch.cuda.get_device_properties(index).total_memory < 16 * 2**30


def optimizer_available(name: str) -> None:
    """Refuse an optimizer whose package is missing, naming what to install (exit 2)."""
    if name == "adamw8bit":
        try:
            import bitsandbytes  # noqa: F401  (optional: not in the lock, its CPU wheel is not needed)
        except ImportError:
            raise BadInput("--optimizer adamw8bit: needs the bitsandbytes package (pip install bitsandbytes); "
                           "use adamw or prodigy") from None
    if name == "prodigy":
        try:
            import prodigyopt  # noqa: F401
        except ImportError:
            raise BadInput("--optimizer prodigy: needs the prodigyopt package (pip install prodigyopt)") from None


def check_runtime(policy: TrainPolicy, device: str, dtype_name: str, family: str = "sd15", preset: str = "") -> None:
    """What the policy asks of this family and machine (a loop for the family, the optimizer's
    package, the precision on this device): checked before any work so a bad option costs
    nothing (exit 2)."""
    loop = check_trainable(family, preset)
    if loop == FLOW_LOOP and policy.train_text_encoder:
        raise BadInput(f"--train-text-encoder: the {family} trainer trains the transformer only (as diffusers' "
                       "scripts for FLUX.2 [klein] and Z-Image do; the text encoder is cached and freed)")
    optimizer_available(policy.optimizer)
    mixed_precision_for(policy, device, dtype_name)


def make_optimizer(params_groups: list[dict[str, Any]], policy: TrainPolicy, device: str):
    import torch

    optimizer_available(policy.optimizer)
    if policy.optimizer == "adamw8bit":
        import bitsandbytes as bnb  # 8-bit states: a quarter of AdamW's optimizer memory

        return bnb.optim.AdamW8bit(params_groups, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    if policy.optimizer == "prodigy":
        from prodigyopt import Prodigy  # learning-rate free: `lr` scales its estimate (use ~1.0)

        # Prodigy refuses groups with different non-zero lr; as diffusers' script does, every
        # group takes the UNet's (text_encoder_lr is ignored with prodigy).
        for group in params_groups:
            group["lr"] = policy.learning_rate

        # diffusers' script: safeguard warmup and bias correction on, decoupled weight decay.
        return Prodigy(params_groups, betas=(0.9, 0.99), weight_decay=1e-2, eps=1e-8, decouple=True,
                       use_bias_correction=True, safeguard_warmup=True)
    # The fused kernel updates every LoRA tensor in one call instead of a Python loop over a few
    # hundred small ones; on CPU and CUDA it is the same AdamW, just without the per-tensor overhead.
    return torch.optim.AdamW(params_groups, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8,
                             fused=device.split(":")[0] in ("cpu", "cuda"))


# --- caching --------------------------------------------------------------------------


def vae_dtype(weight_dtype):
    """The VAE encodes (once per image) in bf16 when training in bf16, as kohya's and diffusers'
    trainers do (bf16 has fp32's range; on a CPU with bf16 instructions an SD1.5 encode at 256 px
    took half the time), and in fp32 otherwise: the SDXL VAE overflows in fp16."""
    import torch

    return torch.bfloat16 if weight_dtype == torch.bfloat16 else torch.float32


def images_to_tensor(images: Sequence[np.ndarray], resolution: int):
    import torch
    from PIL import Image

    batch = []
    for image in images:
        if image.ndim != 3 or image.shape[2] != 3:
            raise BadInput(f"training image of shape {image.shape}: expected HxWx3 RGB")
        pil = Image.fromarray(image)
        if pil.size != (resolution, resolution):
            pil = pil.resize((resolution, resolution), Image.LANCZOS)
        batch.append(torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1).float() / 127.5 - 1.0)
    return torch.stack(batch)


def encode_image(vae, image: np.ndarray, mirrored: bool, resolution: int, device) -> tuple[Any, Any]:
    """Latent distribution (mean, std) of one image or its mirror, as fp32 CPU tensors [c, h, w],
    encoded in the VAE's dtype (see vae_dtype)."""
    import torch

    pixels = images_to_tensor([image], resolution)
    if mirrored:
        pixels = torch.flip(pixels, dims=[3])
    with torch.no_grad():
        dist = vae.encode(pixels.to(device, vae.dtype)).latent_dist
    return dist.mean[0].float().cpu(), dist.std[0].float().cpu()


class LatentCache:
    """Latent mean/std per (example, mirrored), filled on first use.

    Each pair is encoded alone (a batch of one), so a latent never depends on which other
    pairs were encoded beside it: a resumed run, which refills the cache in another order,
    gets bit-identical latents.
    """

    def __init__(self, images: Sequence[np.ndarray], prompt_index: Sequence[int], resolution: int):
        self.images = tuple(images)
        self.prompt_index = tuple(prompt_index)
        self.resolution = resolution
        self.mean: dict[tuple[int, bool], Any] = {}
        self.std: dict[tuple[int, bool], Any] = {}

    def __len__(self) -> int:
        return len(self.images)

    def missing(self, picks: Iterable[tuple[int, bool]]) -> list[tuple[int, bool]]:
        return [p for p in dict.fromkeys(picks) if p not in self.mean]

    def fill(self, vae, picks: Iterable[tuple[int, bool]], device) -> None:
        for index, mirrored in self.missing(picks):
            self.mean[(index, mirrored)], self.std[(index, mirrored)] = encode_image(
                vae, self.images[index], mirrored, self.resolution, device)

    def sample(self, picks: Sequence[tuple[int, bool]], eps, scaling: float, shift: float):
        import torch

        mean = torch.stack([self.mean[p] for p in picks])
        std = torch.stack([self.std[p] for p in picks])
        return (mean + std * eps - shift) * scaling


class PromptCache:
    """Token ids per unique prompt and encoder; with frozen encoders also each prompt's
    embedding (and SDXL's pooled one), filled on first use, one prompt at a time."""

    def __init__(self, prompts: Sequence[str], token_ids: Mapping[str, Any]):
        self.prompts = tuple(prompts)
        self.token_ids = dict(token_ids)  # component -> [n_prompts, L]
        self.embeds: dict[int, Any] = {}  # prompt index -> [L, D]
        self.pooled: dict[int, Any] = {}  # prompt index -> [D2] (SDXL)

    def missing(self, indices: Iterable[int]) -> list[int]:
        return [i for i in dict.fromkeys(indices) if i not in self.embeds]

    def fill(self, models: "TrainModels", indices: Iterable[int], device) -> None:
        import torch

        for i in self.missing(indices):
            with torch.no_grad():
                embeds, pooled = encode_prompts(models, {k: v[i:i + 1] for k, v in self.token_ids.items()}, device)
            self.embeds[i] = embeds[0].float().cpu()
            if pooled is not None:
                self.pooled[i] = pooled[0].float().cpu()

    def cond(self, indices: Sequence[int]) -> tuple[Any, Any | None]:
        import torch

        embeds = torch.stack([self.embeds[i] for i in indices])
        pooled = torch.stack([self.pooled[i] for i in indices]) if self.pooled else None
        return embeds, pooled


def tokenize(tokenizer, prompts: Sequence[str]):
    return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def encode_prompts(models: TrainModels, token_ids: Mapping[str, Any], device: str) -> tuple[Any, Any | None]:
    """Text conditioning the way each family's pipeline builds it.

    SD1.5: the last hidden state. SDXL: the penultimate hidden states of both encoders,
    concatenated, and the pooled projection of the second as `text_embeds`.
    """
    import torch

    if models.family != "sdxl":
        encoder = models.pipeline.text_encoder
        return encoder(token_ids["text_encoder"].to(device))[0], None
    hidden, pooled = [], None
    for name, _tok, encoder in models.text_encoders():
        out = encoder(token_ids[name].to(device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out.text_embeds if hasattr(out, "text_embeds") else out[0]
    return torch.cat(hidden, dim=-1), pooled


def prompt_cache(models: TrainModels, prompts: Sequence[str]) -> PromptCache:
    unique = tuple(dict.fromkeys(prompts))
    return PromptCache(unique, {name: tokenize(tok, unique) for name, tok, _enc in models.text_encoders()})


class Residency:
    """Where the modules a step no longer needs live: the VAE once every latent the run will
    draw is cached, the frozen text encoders once every prompt is.

    With `TrainModels.reload` they leave RAM (the pipeline's attribute is set to None and the
    module is freed) and come back, freshly loaded, for validation renders; without it they
    stay in RAM, parked off the GPU on CUDA.
    """

    def __init__(self, models: TrainModels, device, dtypes: Mapping[str, Any]):
        self.models = models
        self.device = device
        self.dtypes = dict(dtypes)  # component -> the dtype it works in
        self.dropped: set[str] = set()  # freed; `need` reloads them
        self.parked: set[str] = set()  # released but kept (no reloader): on the CPU

    def need(self, names: Iterable[str]) -> None:
        names = [n for n in names if n in self.dtypes]
        missing = [n for n in names if n in self.dropped]
        if missing:
            fresh = self.models.reload(missing)
            for name in missing:
                module = fresh[name]
                module.requires_grad_(False)
                module.eval()
                setattr(self.models.pipeline, name, module)
                self.dropped.discard(name)
        for name in names:
            self.parked.discard(name)
            module = getattr(self.models.pipeline, name)
            if module.device != self.device or module.dtype != self.dtypes[name]:
                module.to(self.device, dtype=self.dtypes[name])

    def release(self, names: Iterable[str]) -> None:
        import torch

        names = [n for n in names if n in self.dtypes and n not in self.dropped | self.parked]
        if not names:
            return
        for name in names:
            if self.models.reload is not None:
                # Moving the weights to the meta device frees them now, whoever still holds the
                # module object; dropping the module and waiting for gc.collect() (it holds
                # reference cycles) cost 0.36 s a call with torch, diffusers and transformers
                # imported (cProfile, tiny model).
                getattr(self.models.pipeline, name).to("meta")
                setattr(self.models.pipeline, name, None)
                self.dropped.add(name)
            else:
                if str(self.device).startswith("cuda"):
                    getattr(self.models.pipeline, name).to("cpu")
                self.parked.add(name)
        if str(self.device).startswith("cuda"):
            torch.cuda.empty_cache()


# --- one step -------------------------------------------------------------------------


def step_generator(seed: int, step: int):
    """All randomness of one step comes from here, so resuming at step k repeats step k."""
    import torch

    return torch.Generator(device="cpu").manual_seed((seed * 1_000_003 + step) % (2**63 - 1))


def example_indices(n: int, count: int, step: int, seed: int) -> list[int]:
    """Epoch-wise shuffling, a pure function of (seed, step) for exact resumes."""
    import torch

    picks = []
    for i in range(count):
        flat = step * count + i
        epoch, offset = divmod(flat, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        picks.append(int(order[offset]))
    return picks


@dataclass(frozen=True)
class StepDraws:
    """What step k samples before the UNet runs: examples, flips and latent noise."""

    picks: tuple[tuple[int, bool], ...]  # (example, mirrored)
    eps: Any  # [b, c, h, w] standard normal, for sampling the latent distribution
    prior_picks: tuple[tuple[int, bool], ...] = ()
    prior_eps: Any = None


def step_draws(policy: TrainPolicy, step: int, gen, n_images: int, n_class: int, latent_shape: Sequence[int]) -> StepDraws:
    """The step's draws, in a fixed order on `gen`. The planner runs it too, to know in advance
    which latents a run will ever need, so it must stay a pure function of (seed, step)."""
    import torch

    def draw(n: int, seed: int):
        idx = example_indices(n, policy.batch_size, step, seed)
        flips = (torch.rand(len(idx), generator=gen) < 0.5).tolist() if policy.flip else [False] * len(idx)
        eps = torch.randn((len(idx), *latent_shape), generator=gen)
        return tuple(zip(idx, map(bool, flips))), eps

    picks, eps = draw(n_images, policy.seed)
    if not n_class:
        return StepDraws(picks, eps)
    prior_picks, prior_eps = draw(n_class, policy.seed + 1)
    return StepDraws(picks, eps, prior_picks, prior_eps)


def time_ids(resolution: int, count: int):
    """SDXL micro-conditioning: original size, crop top-left, target size (aligned crops)."""
    import torch

    row = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], dtype=torch.float32)
    return row.repeat(count, 1)


def diffusion_loss(models: TrainModels, scheduler, latents, cond, pooled, policy: TrainPolicy, gen, device, dtype,
                   prior_count: int = 0):
    """Noise the latents at random timesteps and return the UNet's denoising loss."""
    import torch
    import torch.nn.functional as F

    noise = torch.randn(latents.shape, generator=gen)
    if policy.noise_offset:
        noise = noise + policy.noise_offset * torch.randn(latents.shape[:2] + (1, 1), generator=gen)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=gen)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    kwargs = {}
    if models.family == "sdxl":
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled.to(device, dtype),
                                       "time_ids": time_ids(policy.resolution, latents.shape[0]).to(device, dtype)}
    pred = models.unet(noisy.to(device, dtype), timesteps.to(device), encoder_hidden_states=cond.to(device, dtype),
                       return_dict=False, **kwargs)[0].float()
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    target = target.to(device)
    per_example = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
    if policy.snr_gamma:
        from diffusers.training_utils import compute_snr

        snr = compute_snr(scheduler, timesteps).to(device)
        weights = torch.minimum(snr, torch.full_like(snr, policy.snr_gamma)) / snr
        if scheduler.config.prediction_type == "v_prediction":
            weights = weights / (snr + 1)
        per_example = per_example * weights
    n_instance = latents.shape[0] - prior_count
    loss = per_example[:n_instance].mean()
    if prior_count:
        loss = loss + policy.prior_loss_weight * per_example[n_instance:].mean()
    return loss


# --- checkpoints ----------------------------------------------------------------------


def lora_state(models: TrainModels, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    from peft.utils import get_peft_model_state_dict

    return {
        name: {k: v.detach().float().cpu().clone() for k, v in get_peft_model_state_dict(module).items()}
        for name, module in trained_modules(models, names).items()
    }


def load_lora_state(models: TrainModels, state: Mapping[str, Mapping[str, Any]]) -> None:
    from peft.utils import set_peft_model_state_dict

    for name, module in trained_modules(models, state).items():
        result = set_peft_model_state_dict(module, dict(state[name]))
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise PortraitError(f"checkpoint LoRA for {name} does not fit the model: {unexpected[:3]}")


# --- the loop -------------------------------------------------------------------------


class Precision:
    """Where and in what precision the steps run: the device, autocast, and fp16's loss scaler.

    Why not accelerate's `Accelerator`: its state is one per process, and a second trainer in
    the same process (the service, a batch runner, the test suite) with another mixed precision
    gets "AcceleratorState has already been initialized and cannot be changed". Single-device
    training needs only what it wrapped: torch.autocast and torch.amp.GradScaler.
    """

    def __init__(self, device: str, mixed: str):
        import torch

        self.device = torch.device(device)
        self.mixed = mixed
        self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed, torch.float32)
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none.
        self.scaler = torch.amp.GradScaler(self.device.type) if mixed == "fp16" else None

    def autocast(self):
        import torch

        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.mixed != "no")


@dataclass
class TrainingRun:
    """Everything the loop needs once setup is done: the models with their adapters, the caches,
    the optimizer and schedule. Built by `setup_training`; `step_loss` reads it."""

    models: TrainModels
    policy: TrainPolicy
    precision: Precision
    weight_dtype: Any
    noise_scheduler: Any
    configs: dict[str, Any]
    param_groups: list[dict[str, Any]]
    optimizer: Any
    lr_scheduler: Any
    prompts: PromptCache
    instances: LatentCache
    priors: LatentCache | None
    total: int
    scaling: float
    shift: float
    latent_shape: tuple[int, int, int]
    residency: Residency
    trained_params: list[Any] = field(default_factory=list)
    # The dtypes the caller's modules came in: restored after training (restore_pipeline), so a
    # pipeline handed in as fp32 renders as fp32 again after a bf16 run on CPU.
    given_dtypes: dict[str, Any] = field(default_factory=dict)
    # What the steps still to run will draw and is not cached yet; None until planned.
    pending_latents: set[tuple[str, int, bool]] | None = None
    pending_prompts: set[int] | None = None

    @property
    def device(self):
        return self.precision.device

    @property
    def n_images(self) -> int:
        return len(self.instances)

    @property
    def n_class_images(self) -> int:
        return len(self.priors) if self.priors is not None else 0

    @property
    def frozen_text(self) -> bool:
        return not self.policy.train_text_encoder

    def draws(self, step: int, gen) -> StepDraws:
        return step_draws(self.policy, step, gen, self.n_images, self.n_class_images, self.latent_shape)

    def prompt_indices(self, draws: StepDraws) -> list[int]:
        found = [self.instances.prompt_index[i] for i, _m in draws.picks]
        if self.priors is not None:
            found += [self.priors.prompt_index[i] for i, _m in draws.prior_picks]
        return found

    def plan(self, start: int) -> None:
        """Replay the draws of steps start..total (no model runs) to learn what they will need."""
        latents: set[tuple[str, int, bool]] = set()
        prompts: set[int] = set()
        for step in range(start, self.total):
            draws = self.draws(step, step_generator(self.policy.seed, step))
            latents.update(("instance",) + p for p in draws.picks)
            latents.update(("prior",) + p for p in draws.prior_picks)
            prompts.update(self.prompt_indices(draws))
        self.pending_latents = {k for k in latents if (k[1], k[2]) not in self.cache(k[0]).mean}
        self.pending_prompts = set(self.prompts.missing(prompts)) if self.frozen_text else set()

    def cache(self, name: str) -> LatentCache:
        return self.instances if name == "instance" else self.priors  # type: ignore[return-value]

    def idle_names(self) -> list[str]:
        """What a step never touches once everything it draws is cached."""
        names = ["vae"]
        if self.frozen_text:
            names += list(self.models.encoder_names())
        return names

    def fill(self, draws: StepDraws) -> None:
        """Encode what this step draws and the cache lacks; release what has done its work."""
        if self.pending_latents is None:
            self.plan(0)
        wanted = [("instance",) + p for p in draws.picks] + [("prior",) + p for p in draws.prior_picks]
        if any((k[1], k[2]) not in self.cache(k[0]).mean for k in wanted):
            self.residency.need(["vae"])
            self.instances.fill(self.models.vae, draws.picks, self.device)
            if self.priors is not None:
                self.priors.fill(self.models.vae, draws.prior_picks, self.device)
        prompts = self.prompt_indices(draws)
        if self.frozen_text and self.prompts.missing(prompts):
            texts = list(self.models.encoder_names())
            self.residency.need(texts)
            self.prompts.fill(self.models, prompts, self.device)
        self.pending_latents.difference_update(wanted)
        self.pending_prompts.difference_update(prompts)  # type: ignore[union-attr]
        self.release_done()

    def prefill(self, start: int) -> None:
        """Encode, before the first step, every latent and prompt the steps start..total will
        draw, then free the VAE and the frozen text encoders: the loop runs the denoiser alone.
        (Encoding on first use made steps 2-3 of a run twice as slow as the later ones.)"""
        self.plan(start)
        latents = sorted(self.pending_latents or ())
        if latents:
            self.residency.need(["vae"])
            for name in ("instance", "prior"):
                picks = [(index, mirrored) for cache, index, mirrored in latents if cache == name]
                if picks:
                    self.cache(name).fill(self.models.vae, picks, self.device)
        prompts = sorted(self.pending_prompts or ())
        if self.frozen_text and prompts:
            self.residency.need(self.models.encoder_names())
            self.prompts.fill(self.models, prompts, self.device)
        self.pending_latents, self.pending_prompts = set(), set()
        self.release_done()

    def release_done(self) -> None:
        if self.pending_latents is None:  # not planned yet: whatever is there is still needed
            return
        done = []
        if not self.pending_latents:
            done.append("vae")
        if self.frozen_text and not self.pending_prompts:
            done += list(self.models.encoder_names())
        self.residency.release(done)


def setup_training(models: TrainModels, data: TrainData, policy: TrainPolicy, total: int, *, device: str = "cpu",
                   dtype_name: str = "float32", emit: Callable[[TrainEvent], None] | None = None) -> TrainingRun:
    """Place the models, add the LoRA adapters, build the (empty) caches and the optimizer.

    Nothing is encoded here: the first step encodes what it draws (see TrainingRun.fill).
    """
    import torch
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params

    mixed = mixed_precision_for(policy, device, dtype_name, unet_dtype=models.unet.dtype)
    optimizer_available(policy.optimizer)  # refuse a missing package before any work
    precision = Precision(device, mixed)
    weight_dtype = precision.dtype
    dtypes = {"vae": vae_dtype(weight_dtype), **{name: weight_dtype for name, _t, _e in models.text_encoders()}}
    given = {"unet": models.unet.dtype, "vae": models.vae.dtype,
             **{name: enc.dtype for name, _t, enc in models.text_encoders()}}
    for module in (models.unet, models.vae, *[enc for _n, _t, enc in models.text_encoders()]):
        module.requires_grad_(False)
    if models.unet.device != precision.device or models.unet.dtype != weight_dtype:
        models.unet.to(precision.device, dtype=weight_dtype)
    residency = Residency(models, precision.device, dtypes)
    residency.need(dtypes)

    configs = lora_configs(policy, models)
    add_adapters(models, configs, policy.seed)
    trainables = trained_modules(models, configs)
    for module in trainables.values():
        for name, p in module.named_parameters():
            p.requires_grad_("lora_" in name)
    # LoRA weights train in fp32 even when the frozen base runs in fp16 (diffusers does the same).
    cast_training_params(list(trainables.values()), dtype=torch.float32)
    if gradient_checkpointing_for(policy, str(precision.device)):
        models.unet.enable_gradient_checkpointing()
        for name in TEXT_COMPONENTS:
            if name in trainables:
                trainables[name].gradient_checkpointing_enable()
    # Attention already runs through torch's scaled_dot_product_attention (diffusers' default
    # AttnProcessor2_0): flash / memory-efficient kernels on CUDA, the flash kernel on CPU.
    # channels_last was measured slower on CPU (SD1.5 step at 256 px: 7.3 s against 7.0 s).

    class_prompt = data.class_prompt or policy.class_prompt.format(**{"class": data.class_word})
    prompts = prompt_cache(models, list(data.captions) + ([class_prompt] if data.class_images else []))
    instances = LatentCache(data.images, [prompts.prompts.index(c) for c in data.captions], policy.resolution)
    priors = (LatentCache(data.class_images, [prompts.prompts.index(class_prompt)] * len(data.class_images),
                          policy.resolution) if data.class_images else None)
    vae_config = models.vae.config
    factor = 2 ** (len(vae_config.block_out_channels) - 1)
    latent_shape = (int(vae_config.latent_channels), policy.resolution // factor, policy.resolution // factor)

    groups = [{"params": [p for p in models.unet.parameters() if p.requires_grad], "lr": policy.learning_rate}]
    for name in TEXT_COMPONENTS:
        if name in trainables:
            groups.append({"params": [p for p in trainables[name].parameters() if p.requires_grad],
                           "lr": policy.text_encoder_lr})
    optimizer = make_optimizer(groups, policy, device)
    lr_scheduler = get_scheduler(policy.lr_scheduler, optimizer=optimizer, num_warmup_steps=policy.lr_warmup_steps,
                                 num_training_steps=total)
    return TrainingRun(
        models=models, policy=policy, precision=precision, weight_dtype=weight_dtype,
        noise_scheduler=DDPMScheduler.from_config(models.pipeline.scheduler.config), configs=configs,
        param_groups=groups, optimizer=optimizer, lr_scheduler=lr_scheduler, prompts=prompts, instances=instances,
        priors=priors, total=total, scaling=float(vae_config.scaling_factor),
        shift=float(vae_config.get("shift_factor") or 0.0), latent_shape=latent_shape, residency=residency,
        trained_params=[p for g in groups for p in g["params"]], given_dtypes=given,
    )


def step_loss(run: TrainingRun, step: int):
    """The loss of training step `step`: its batch, flips, noise and timesteps depend only on (seed, step)."""
    import torch

    policy = run.policy
    gen = step_generator(policy.seed, step)
    draws = run.draws(step, gen)
    run.fill(draws)
    latents = run.instances.sample(draws.picks, draws.eps, run.scaling, run.shift)
    prompt_idx = run.prompt_indices(draws)
    prior_count = 0
    if run.priors is not None:
        plat = run.priors.sample(draws.prior_picks, draws.prior_eps, run.scaling, run.shift)
        latents, prior_count = torch.cat([latents, plat]), len(draws.prior_picks)
    with run.precision.autocast():
        if run.frozen_text:
            cond, pooled = run.prompts.cond(prompt_idx)
        else:
            cond, pooled = encode_prompts(run.models, {k: v[prompt_idx] for k, v in run.prompts.token_ids.items()},
                                          run.device)
        return diffusion_loss(run.models, run.noise_scheduler, latents, cond, pooled, policy, gen, run.device,
                              run.weight_dtype, prior_count)


def optimize(run: TrainingRun, loss) -> None:
    import torch

    scaler = run.precision.scaler
    if scaler is None:
        loss.backward()
        if run.policy.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(run.trained_params, run.policy.max_grad_norm, foreach=True)
        run.optimizer.step()
    else:  # fp16: scale the loss, unscale before clipping, skip a step whose gradients overflowed
        scaler.scale(loss).backward()
        scaler.unscale_(run.optimizer)
        if run.policy.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(run.trained_params, run.policy.max_grad_norm, foreach=True)
        scaler.step(run.optimizer)
        scaler.update()
    run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
