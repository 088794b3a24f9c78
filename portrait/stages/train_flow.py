"""The flow-matching training step: FLUX.1 [dev], FLUX.2 [klein] and Z-Image transformer LoRAs.

What the step computes is diffusers' reference scripts' step, family by family
(examples/dreambooth/train_dreambooth_lora_flux.py, train_dreambooth_lora_flux2_klein.py,
train_dreambooth_lora_z_image.py), and tests/test_train_flow_reference.py checks it against
fixtures those scripts produced on the tiny stand-ins (recorded by scripts/reference_fixtures.py):

- the model input: the VAE latent, drawn from the latent distribution for FLUX.1 (`sample()`,
  then `(x - shift) * scale`), its mode for Z-Image (`(mode - shift) * scale`) and FLUX.2
  (`mode`, patchified 2x2 into 128 channels, then normalized by the VAE's batch-norm statistics);
- noise ~ N(0, I) of the model input's shape; u from the family's timestep density
  (`compute_density_for_timestep_sampling`: uniform, logit-normal or mode, the policy's
  `weighting_scheme`); the timestep is the training scheduler's `timesteps[int(u * 1000)]` and
  sigma its `sigmas[...]` (FLUX.1-dev's and klein's schedulers shift dynamically, at inference
  only, so their training sigmas are unshifted; Z-Image's config shifts statically by 3, so
  its training sigmas lean towards noise);
- x_t = (1 - sigma) x_0 + sigma noise; target = noise - x_0; loss = mean of
  `compute_loss_weighting_for_sd3(sigma) * (pred - target)^2` per example, then over the batch
  (+ the prior term);
- the call: FLUX.1 packs 2x2 patches into tokens, passes `timestep / 1000`, the pooled CLIP
  embedding and, where the transformer has a guidance embedding (-dev), the distilled guidance;
  FLUX.2 passes 4-D position ids for latents and text and `timestep / 1000`; Z-Image takes lists
  of (C, 1, H, W) latents and of unpadded prompt embeddings, the reversed time
  `(1000 - t) / 1000`, and predicts the negated velocity.

What differs from the scripts is only where the inputs come from: every latent and prompt
embedding is computed once before step 1 (the scripts encode the prompt once but, unless
`--cache_latents`, run the VAE on every step), the text encoders and VAE are freed before the
loop, and every random draw of step k (batch, flips, latent sample, noise, u) comes from the
generator seeded by (seed, k), which is what makes a resumed run equal to an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from portrait.core.errors import BadInput
from portrait.stages.train_run import (LatentCache, Precision, Residency, StepDraws, TrainingRun, add_adapters,
                                       gradient_checkpointing_for, lora_configs, make_optimizer, mixed_precision_for,
                                       optimizer_available, step_generator, trained_modules, vae_dtype)
from portrait.stages.train_types import TrainData, TrainModels, TrainPolicy

# latent: how the model input comes from the VAE's latent distribution (the scripts' choice).
LATENT_DRAW = {"flux": "sample", "flux2-klein": "mode", "zimage": "mode"}


class FlowPromptCache:
    """Each unique prompt's embedding from the family's pipeline, computed once (one prompt at a
    time, so an embedding never depends on which prompts were encoded beside it).

    `embeds[i]` is [L, D] ([L_i, D] for Z-Image, whose pipeline drops the padding); `pooled[i]`
    is FLUX.1's pooled CLIP embedding [P]."""

    def __init__(self, family: str, prompts: Sequence[str], policy: TrainPolicy):
        self.family = family
        self.prompts = tuple(prompts)
        self.policy = policy
        self.embeds: dict[int, Any] = {}
        self.pooled: dict[int, Any] = {}
        self.token_ids: dict[str, Any] = {}  # the UNet loop's; the flow loop never trains a text encoder

    def missing(self, indices: Iterable[int]) -> list[int]:
        return [i for i in dict.fromkeys(indices) if i not in self.embeds]

    def fill(self, models: TrainModels, indices: Iterable[int], device) -> None:
        import torch

        for i in self.missing(indices):
            with torch.no_grad():
                embeds, pooled = encode_prompt(models, self.prompts[i], self.policy, device)
            self.embeds[i] = embeds.float().cpu()
            if pooled is not None:
                self.pooled[i] = pooled.float().cpu()


def encode_prompt(models: TrainModels, prompt: str, policy: TrainPolicy, device) -> tuple[Any, Any | None]:
    """One prompt through the family's own `encode_prompt`, as the reference scripts call it:
    (embedding [L, D], pooled [P] or None)."""
    pipe = models.pipeline
    if models.family == "flux":
        embeds, pooled, _ids = pipe.encode_prompt(prompt=[prompt], prompt_2=None, device=device,
                                                  max_sequence_length=policy.max_sequence_length)
        return embeds[0], pooled[0]
    if models.family == "flux2-klein":
        extra = {"text_encoder_out_layers": tuple(policy.text_encoder_out_layers)} if policy.text_encoder_out_layers else {}
        embeds, _ids = pipe.encode_prompt(prompt=[prompt], device=device,
                                          max_sequence_length=policy.max_sequence_length, **extra)
        return embeds[0], None
    embeds, _negative = pipe.encode_prompt(prompt=[prompt], device=device, do_classifier_free_guidance=False,
                                           max_sequence_length=policy.max_sequence_length)
    return embeds[0], None


@dataclass
class FlowRun(TrainingRun):
    """A TrainingRun whose denoiser is a flow-matching transformer (see the module docstring)."""

    latent_draw: str = "sample"
    # FLUX.2's VAE batch-norm statistics of the patchified latent ([1, 128, 1, 1] each), kept
    # apart so the VAE can leave once the latents are cached.
    bn_mean: Any = None
    bn_std: Any = None
    vae_scale_factor: int = 8
    guidance: bool = False  # the transformer has a guidance embedding (FLUX.1-dev)


def setup_flow_training(models: TrainModels, data: TrainData, policy: TrainPolicy, total: int, *, device: str = "cpu",
                        dtype_name: str = "float32") -> FlowRun:
    """Place the models, add the transformer LoRA, build the (empty) caches and the optimizer."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params

    family = models.family
    if policy.train_text_encoder:
        raise BadInput(f"--train-text-encoder: the {family} trainer trains the transformer only")
    transformer = models.denoiser
    mixed = mixed_precision_for(policy, device, dtype_name, unet_dtype=transformer.dtype)
    optimizer_available(policy.optimizer)
    precision = Precision(device, mixed)
    weight_dtype = precision.dtype
    encoders = models.encoder_names()
    # The VAE encodes once per image (bf16 when training in bf16, else fp32); the text encoders
    # run in the training precision.
    dtypes = {"vae": vae_dtype(weight_dtype), **{name: weight_dtype for name in encoders}}
    given = {"transformer": transformer.dtype, "vae": models.vae.dtype,
             **{name: getattr(models.pipeline, name).dtype for name in encoders}}
    for name in ("transformer", "vae", *encoders):
        getattr(models.pipeline, name).requires_grad_(False)
    if transformer.device != precision.device or transformer.dtype != weight_dtype:
        transformer.to(precision.device, dtype=weight_dtype)
    residency = Residency(models, precision.device, dtypes)
    residency.need(dtypes)

    configs = lora_configs(policy, models)
    add_adapters(models, configs, policy.seed)
    trainables = trained_modules(models, configs)
    for name, p in transformer.named_parameters():
        p.requires_grad_("lora_" in name)
    # LoRA weights train in fp32 under a bf16/fp16 base (the scripts do so under fp16).
    cast_training_params(list(trainables.values()), dtype=torch.float32)
    if gradient_checkpointing_for(policy, str(precision.device)):
        transformer.enable_gradient_checkpointing()

    class_prompt = data.class_prompt or policy.class_prompt.format(**{"class": data.class_word})
    prompts = FlowPromptCache(family, tuple(dict.fromkeys(list(data.captions) + ([class_prompt] if data.class_images
                                                                                  else []))), policy)
    instances = LatentCache(data.images, [prompts.prompts.index(c) for c in data.captions], policy.resolution)
    priors = (LatentCache(data.class_images, [prompts.prompts.index(class_prompt)] * len(data.class_images),
                          policy.resolution) if data.class_images else None)
    vae = models.vae
    config = vae.config
    factor = 2 ** (len(config.block_out_channels) - 1)
    latent_shape = (int(config.latent_channels), policy.resolution // factor, policy.resolution // factor)
    bn_mean = bn_std = None
    if family == "flux2-klein":
        bn_mean = vae.bn.running_mean.detach().float().cpu().view(1, -1, 1, 1).clone()
        bn_std = torch.sqrt(vae.bn.running_var.detach().float().cpu().view(1, -1, 1, 1) + config.batch_norm_eps)

    groups = [{"params": [p for p in transformer.parameters() if p.requires_grad], "lr": policy.learning_rate}]
    optimizer = make_optimizer(groups, policy, device)
    lr_scheduler = get_scheduler(policy.lr_scheduler, optimizer=optimizer, num_warmup_steps=policy.lr_warmup_steps,
                                 num_training_steps=total)
    return FlowRun(
        models=models, policy=policy, precision=precision, weight_dtype=weight_dtype,
        noise_scheduler=FlowMatchEulerDiscreteScheduler.from_config(models.pipeline.scheduler.config),
        configs=configs, param_groups=groups, optimizer=optimizer, lr_scheduler=lr_scheduler, prompts=prompts,  # type: ignore[arg-type]
        instances=instances, priors=priors, total=total, scaling=float(config.get("scaling_factor") or 1.0),
        shift=float(config.get("shift_factor") or 0.0), latent_shape=latent_shape, residency=residency,
        trained_params=[p for g in groups for p in g["params"]], given_dtypes=given,
        latent_draw=LATENT_DRAW[family], bn_mean=bn_mean, bn_std=bn_std, vae_scale_factor=factor,
        guidance=bool(getattr(transformer.config, "guidance_embeds", False)),
    )


# --- one step -------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlowInputs:
    """Everything random in one flow-matching step, drawn in a fixed order from the step's
    generator: the batch and flips, the latent sample's eps (StepDraws), then the noise and u.
    tests/train_reference.py feeds these same tensors to diffusers' script when recording."""

    draws: StepDraws
    noise: Any  # [B, C, H, W] of the model input (FLUX.2: the patchified latent)
    u: Any  # [B] in (0, 1): the timestep density's sample


def model_input(run: FlowRun, draws: StepDraws):
    """The family's x_0 for the step's batch (instances, then class images), fp32 on the CPU."""
    import torch

    def take(cache: LatentCache, picks, eps):
        mean = torch.stack([cache.mean[p] for p in picks])
        if run.latent_draw == "sample":
            mean = mean + torch.stack([cache.std[p] for p in picks]) * eps
        return mean

    x = take(run.instances, draws.picks, draws.eps)
    if run.priors is not None and draws.prior_picks:
        x = torch.cat([x, take(run.priors, draws.prior_picks, draws.prior_eps)])
    if run.bn_mean is not None:  # FLUX.2: patchify 2x2, then the VAE's batch norm
        from diffusers import Flux2KleinPipeline

        return (Flux2KleinPipeline._patchify_latents(x) - run.bn_mean) / run.bn_std
    return (x - run.shift) * run.scaling


def step_inputs(run: FlowRun, step: int, x0_shape: Sequence[int] | None = None) -> FlowInputs:
    """The step's draws, a pure function of (seed, step) (see FlowInputs)."""
    import torch
    from diffusers.training_utils import compute_density_for_timestep_sampling

    policy = run.policy
    gen = step_generator(policy.seed, step)
    draws = run.draws(step, gen)
    if x0_shape is None:
        x0_shape = model_input_shape(run, len(draws.picks) + len(draws.prior_picks))
    noise = torch.randn(tuple(x0_shape), generator=gen)
    u = compute_density_for_timestep_sampling(weighting_scheme=policy.weighting_scheme, batch_size=x0_shape[0],
                                              logit_mean=policy.logit_mean, logit_std=policy.logit_std,
                                              mode_scale=policy.mode_scale, generator=gen)
    return FlowInputs(draws, noise, u)


def model_input_shape(run: FlowRun, batch: int) -> tuple[int, ...]:
    c, h, w = run.latent_shape
    if run.bn_mean is not None:
        return (batch, c * 4, h // 2, w // 2)
    return (batch, c, h, w)


def flow_step_loss(run: FlowRun, step: int):
    """The loss of training step `step` (its draws depend only on (seed, step))."""
    inputs = step_inputs(run, step)
    run.fill(inputs.draws)
    return flow_loss(run, inputs)


def timesteps_and_sigmas(scheduler, u):
    """The scripts' lookup: timestep = timesteps[int(u * N)], sigma the schedule's sigma there."""
    indices = (u * scheduler.config.num_train_timesteps).long()
    return scheduler.timesteps[indices], scheduler.sigmas[indices]


def flow_loss(run: FlowRun, inputs: FlowInputs):
    """The reference scripts' flow-matching loss for the given draws."""
    import torch
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    policy, device, dtype = run.policy, run.device, run.weight_dtype
    x0 = model_input(run, inputs.draws)
    noise = inputs.noise
    timesteps, sigmas = timesteps_and_sigmas(run.noise_scheduler, inputs.u)
    sigmas = sigmas.view(-1, 1, 1, 1).float()
    noisy = (1.0 - sigmas) * x0 + sigmas * noise
    prompt_idx = run.prompt_indices(inputs.draws)
    with run.precision.autocast():
        pred = predict(run, noisy.to(device, dtype), timesteps.to(device), prompt_idx)
    target = (noise - x0).to(device)
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=policy.weighting_scheme, sigmas=sigmas).to(device)
    per_example = (weighting.float() * (pred.float() - target.float()) ** 2).reshape(target.shape[0], -1).mean(1)
    n_instance = len(inputs.draws.picks)
    loss = per_example[:n_instance].mean()
    if n_instance < per_example.shape[0]:
        loss = loss + policy.prior_loss_weight * per_example[n_instance:].mean()
    return loss


def predict(run: FlowRun, noisy, timesteps, prompt_idx: Sequence[int]):
    """The transformer's prediction of the velocity (noise - x_0) in the model input's layout."""
    import torch

    transformer, family = run.models.denoiser, run.models.family
    device, dtype = run.device, run.weight_dtype
    prompts: FlowPromptCache = run.prompts  # type: ignore[assignment]
    batch = noisy.shape[0]
    if family == "zimage":
        embeds = [prompts.embeds[i].to(device, dtype) for i in prompt_idx]
        latents = list(noisy.unsqueeze(2).unbind(dim=0))  # [B, C, H, W] -> B x [C, 1, H, W]
        out = transformer(latents, (1000 - timesteps) / 1000, embeds, return_dict=False)[0]
        return -torch.stack(out, dim=0).squeeze(2)  # Z-Image predicts the negated velocity
    embeds = torch.stack([prompts.embeds[i] for i in prompt_idx]).to(device, dtype)
    guidance = torch.full((batch,), float(run.policy.guidance_scale), device=device) if run.guidance else None
    if family == "flux":
        from diffusers import FluxPipeline

        _, c, h, w = noisy.shape
        packed = FluxPipeline._pack_latents(noisy, batch_size=batch, num_channels_latents=c, height=h, width=w)
        img_ids = FluxPipeline._prepare_latent_image_ids(batch, h // 2, w // 2, device, dtype)
        txt_ids = torch.zeros(embeds.shape[1], 3, device=device, dtype=dtype)
        pooled = torch.stack([prompts.pooled[i] for i in prompt_idx]).to(device, dtype)
        out = transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                          pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=txt_ids, img_ids=img_ids,
                          return_dict=False)[0]
        factor = run.vae_scale_factor
        return FluxPipeline._unpack_latents(out, height=h * factor, width=w * factor, vae_scale_factor=factor)
    from diffusers import Flux2KleinPipeline

    img_ids = Flux2KleinPipeline._prepare_latent_ids(noisy).to(device)
    txt_ids = Flux2KleinPipeline._prepare_text_ids(embeds).to(device)
    packed = Flux2KleinPipeline._pack_latents(noisy)
    out = transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance, encoder_hidden_states=embeds,
                      txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
    out = out[:, : packed.size(1)]
    return Flux2KleinPipeline._unpack_latents_with_ids(out, img_ids)


def lora_parameters(module) -> Mapping[str, Any]:
    """The LoRA parameters of a module by name (for gradient checks)."""
    return {name: p for name, p in module.named_parameters() if "lora_" in name}


__all__ = ["FlowRun", "FlowInputs", "FlowPromptCache", "LATENT_DRAW", "setup_flow_training", "step_inputs",
           "flow_step_loss", "flow_loss", "model_input", "predict", "encode_prompt", "timesteps_and_sigmas",
           "lora_parameters"]
