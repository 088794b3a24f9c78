"""Identity LoRA training: DreamBooth-style LoRA on the UNet (and optionally the text encoders).

Inputs: the base pipeline's components (`TrainModels`), the prepared images and captions
(`TrainData`), a `TrainPolicy` from the preset's `train` section, and a work folder.
Output: a `TrainResult` holding the selected LoRA weights, every checkpoint's validation
scores, the loss curve and timings.

Why it is fast: the VAE latents (of each image and its mirror) and, when the text encoders
are frozen, the text embeddings are computed once up front, so a step costs only the UNet
forward and backward. diffusers' train_dreambooth_lora.py runs the VAE and text encoder on
every step instead (bench/train_speed.py measures the difference).

Why it is resumable: every `checkpoint_every` steps the LoRA, the optimizer, the LR
schedule and the RNG states are written atomically (a temp folder renamed into place), and
all randomness of step k comes from a generator seeded by (seed, k), so a run killed at any
point and resumed from its last checkpoint reproduces the uninterrupted run on CPU.

Validation and selection follow EasyPhoto: each checkpoint renders a few images from fixed
seeds, a face scorer rates their identity similarity, and the final LoRA is the average of
the checkpoints behind the best images (or the best single checkpoint, per preset).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from portrait.core.errors import BadInput, PortraitError
from portrait.core.io import atomic_path, write_json

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
TEXT_COMPONENTS = ("text_encoder", "text_encoder_2")
RUN_FILE = "run.json"
CHECKPOINTS = "checkpoints"

# A face scorer maps one generated RGB uint8 image to its identity similarity with the
# consensus, or None when it finds no face (which scores 0, never an error).
FaceScorer = Callable[[np.ndarray], "float | None"]


# --- values ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainPolicy:
    """The `train` section of a preset (defaults documented in presets/sd15.yaml)."""

    rank: int = 32
    alpha: float = 16.0
    learning_rate: float = 1e-4
    text_encoder_lr: float = 5e-5
    train_text_encoder: bool = False
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    steps: int | None = None  # explicit step count; else steps_per_photo x photos, clamped
    steps_per_photo: int = 100
    min_steps: int = 200
    max_steps: int = 800
    batch_size: int = 1
    resolution: int = 512
    flip: bool = True
    snr_gamma: float | None = None  # Min-SNR weighting; None = plain MSE
    noise_offset: float = 0.0
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = True
    use_8bit_adam: bool = True  # only when bitsandbytes imports and the device is CUDA
    mixed_precision: str = "auto"  # auto (fp16/bf16 per placement on CUDA, fp32 on CPU) | no | fp16 | bf16
    seed: int = 0
    unet_targets: tuple[str, ...] = UNET_TARGETS
    text_targets: tuple[str, ...] = TEXT_TARGETS
    checkpoint_every: int = 100
    validation_prompts: tuple[str, ...] = ("a close-up photo of {trigger} {class}, looking at the camera",)
    validation_negative: str = "blurry, lowres, deformed"
    validation_seeds: tuple[int, ...] = (1, 2)
    validation_steps: int = 20
    validation_guidance: float = 6.0
    selection: str = "average"  # average (EasyPhoto) | best | last
    select_top_images: int = 10  # average the checkpoints behind the best N validation images
    prior_preservation: bool = False
    prior_loss_weight: float = 1.0
    class_images: int = 50
    class_prompt: str = "a photo of a {class}"
    class_steps: int = 25
    keep_checkpoints: bool = False

    @classmethod
    def from_section(cls, section: Mapping[str, Any], **overrides: Any) -> "TrainPolicy":
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(section) - known)
        if unknown:
            raise BadInput(f"preset train section: unknown keys {', '.join(unknown)}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in section.items()}
        values.update({k: v for k, v in overrides.items() if v is not None})
        policy = cls(**values)
        policy.check()
        return policy

    def check(self) -> None:
        if self.rank < 1:
            raise BadInput(f"--rank {self.rank}: must be at least 1")
        if self.steps is not None and self.steps < 1:
            raise BadInput(f"--steps {self.steps}: must be at least 1")
        if self.selection not in ("average", "best", "last"):
            raise BadInput(f"preset train.selection '{self.selection}': use average, best or last")
        if self.checkpoint_every < 1 or self.batch_size < 1 or self.resolution < 8:
            raise BadInput("preset train section: checkpoint_every, batch_size and resolution must be positive")

    def total_steps(self, n_photos: int) -> int:
        """EasyPhoto's rule: steps grow with the photo count, clamped to a range."""
        if self.steps is not None:
            return int(self.steps)
        return int(min(max(self.steps_per_photo * n_photos, self.min_steps), self.max_steps))

    def checkpoint_steps(self, total: int) -> list[int]:
        steps = list(range(self.checkpoint_every, total + 1, self.checkpoint_every))
        return steps if steps and steps[-1] == total else steps + [total]


@dataclass(frozen=True)
class TrainModels:
    """The base model's components, taken from a loaded diffusers pipeline.

    The trainer adds a LoRA adapter to `pipeline.unet` (and text encoders), so pass a
    pipeline of its own, not one shared through the ModelCache with other work.
    """

    family: str  # sd15 | sdxl
    pipeline: Any

    @property
    def unet(self):
        return self.pipeline.unet

    @property
    def vae(self):
        return self.pipeline.vae

    def text_encoders(self) -> list[tuple[str, Any, Any]]:
        """(component name, tokenizer, encoder) for each text encoder the family uses."""
        pairs = [("text_encoder", self.pipeline.tokenizer, self.pipeline.text_encoder)]
        if self.family == "sdxl":
            pairs.append(("text_encoder_2", self.pipeline.tokenizer_2, self.pipeline.text_encoder_2))
        return pairs


@dataclass(frozen=True)
class TrainData:
    """Aligned square RGB crops with one caption each, plus optional prior-preservation images."""

    images: tuple[np.ndarray, ...]
    captions: tuple[str, ...]
    trigger: str
    class_word: str
    class_images: tuple[np.ndarray, ...] = ()
    class_prompt: str = ""

    def fingerprint(self) -> str:
        import hashlib

        digest = hashlib.sha256()
        for image, caption in zip(self.images, self.captions):
            digest.update(np.ascontiguousarray(image).tobytes())
            digest.update(caption.encode())
        for image in self.class_images:
            digest.update(np.ascontiguousarray(image).tobytes())
        digest.update(self.class_prompt.encode())
        return digest.hexdigest()


@dataclass(frozen=True)
class TrainEvent:
    """Progress, for bars and logs. phase: cache | class_images | step | validate | select."""

    phase: str
    step: int
    total: int
    loss: float | None = None
    message: str = ""


@dataclass(frozen=True)
class CheckpointRecord:
    step: int
    path: Path
    loss: float  # mean training loss over the steps since the previous checkpoint
    scores: tuple[float, ...]  # one per validation image (0 where no face was found)

    @property
    def score(self) -> float:
        return float(np.mean(self.scores)) if self.scores else 0.0


@dataclass(frozen=True)
class TrainResult:
    lora: dict[str, dict[str, Any]]  # component -> peft state dict (torch tensors, fp32, CPU)
    rank: int
    alpha: float
    steps: int
    losses: tuple[float, ...]
    checkpoints: tuple[CheckpointRecord, ...]
    selected: tuple[int, ...]  # the checkpoint steps merged into `lora`
    selection: str
    timings: dict[str, float]
    resumed_from: int = 0
    params: dict[str, Any] = field(default_factory=dict)


# --- setup ----------------------------------------------------------------------------


def lora_configs(policy: TrainPolicy, models: TrainModels) -> dict[str, Any]:
    """One peft LoraConfig per trained component (gaussian init as in diffusers' scripts)."""
    from peft import LoraConfig

    configs = {
        "unet": LoraConfig(r=policy.rank, lora_alpha=policy.alpha, init_lora_weights="gaussian",
                           target_modules=list(policy.unet_targets))
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

    if getattr(models.unet, "peft_config", None):
        raise PortraitError("the base UNet already carries a LoRA adapter; give the trainer a fresh pipeline")
    # peft draws the initial LoRA A matrices from the global RNG; seed it so runs repeat.
    torch.manual_seed(seed)
    for name, config in configs.items():
        getattr(models.pipeline, name).add_adapter(config)


def mixed_precision_for(policy: TrainPolicy, device: str, dtype_name: str) -> str:
    if not device.startswith("cuda"):
        return "no"  # CPU trains in fp32: fp16 matmuls on CPU are slow or unsupported
    if policy.mixed_precision != "auto":
        return policy.mixed_precision
    return {"float16": "fp16", "bfloat16": "bf16"}.get(dtype_name, "no")


def make_optimizer(params_groups: list[dict[str, Any]], policy: TrainPolicy, device: str):
    import torch

    if policy.use_8bit_adam and device.startswith("cuda"):
        try:
            import bitsandbytes as bnb  # optional: 8-bit Adam halves optimizer memory on CUDA

            return bnb.optim.AdamW8bit(params_groups, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
        except ImportError:
            pass
    # The fused kernel updates every LoRA tensor in one call instead of a Python loop over a few
    # hundred small ones; on CPU and CUDA it is the same AdamW, just without the per-tensor overhead.
    return torch.optim.AdamW(params_groups, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8,
                             fused=device.split(":")[0] in ("cpu", "cuda"))


# --- caching --------------------------------------------------------------------------


@dataclass(frozen=True)
class EncodedSet:
    """Per example: latent mean/std for the image and its mirror, and the caption's index."""

    mean: Any  # [n, 2, c, h, w] (index 1 = mirrored)
    std: Any
    prompt_index: tuple[int, ...]


@dataclass(frozen=True)
class PromptCache:
    """Token ids per unique prompt and encoder; embeddings too when the encoders are frozen."""

    prompts: tuple[str, ...]
    token_ids: dict[str, Any]  # component -> [n_prompts, L]
    embeds: Any | None  # [n_prompts, L, D] when frozen
    pooled: Any | None  # [n_prompts, D2] (SDXL) when frozen


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


def encode_images(vae, images: Sequence[np.ndarray], resolution: int, device: str) -> tuple[Any, Any]:
    """Latent distribution (mean, std) of each image and its mirror, computed once.

    The VAE runs in fp32 here whatever the training precision: it runs only once, and the
    SDXL VAE overflows in fp16.
    """
    import torch

    original_dtype = vae.dtype
    if original_dtype != torch.float32:
        vae.to(dtype=torch.float32)
    means, stds = [], []
    with torch.no_grad():
        for pixels in images_to_tensor(images, resolution).split(4):
            pixels = pixels.to(device)
            pair = torch.stack([pixels, torch.flip(pixels, dims=[3])], dim=1)  # [b, 2, 3, H, W]
            dist = vae.encode(pair.flatten(0, 1)).latent_dist
            shape = (pair.shape[0], 2) + tuple(dist.mean.shape[1:])
            means.append(dist.mean.reshape(shape).cpu())
            stds.append(dist.std.reshape(shape).cpu())
    if original_dtype != torch.float32:
        vae.to(dtype=original_dtype)
    return torch.cat(means), torch.cat(stds)


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


def build_prompt_cache(models: TrainModels, prompts: Sequence[str], frozen: bool, device: str) -> PromptCache:
    import torch

    unique = tuple(dict.fromkeys(prompts))
    token_ids = {name: tokenize(tok, unique) for name, tok, _enc in models.text_encoders()}
    if not frozen:
        return PromptCache(unique, token_ids, None, None)
    with torch.no_grad():
        embeds, pooled = encode_prompts(models, token_ids, device)
    return PromptCache(unique, token_ids, embeds.float().cpu(), None if pooled is None else pooled.float().cpu())


def encode_set(models: TrainModels, images, captions, prompts: PromptCache, resolution: int, device: str) -> EncodedSet:
    mean, std = encode_images(models.vae, images, resolution, device)
    return EncodedSet(mean, std, tuple(prompts.prompts.index(c) for c in captions))


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


def sample_batch(encoded: EncodedSet, indices: Sequence[int], flips: Any, gen, scaling: float, shift: float):
    import torch

    mean = torch.stack([encoded.mean[i, int(f)] for i, f in zip(indices, flips)])
    std = torch.stack([encoded.std[i, int(f)] for i, f in zip(indices, flips)])
    latents = mean + std * torch.randn(mean.shape, generator=gen)
    return (latents - shift) * scaling, [encoded.prompt_index[i] for i in indices]


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


def flatten_state(state: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    return {f"{name}.{key}": value.contiguous() for name, part in state.items() for key, value in part.items()}


def unflatten_state(flat: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        name, rest = key.split(".", 1)
        out.setdefault(name, {})[rest] = value
    return out


def rng_state() -> dict[str, Any]:
    import torch

    # Steps draw from step_generator; these global states are saved anyway so anything else
    # random (a dropout a preset switches on, a custom scheduler) also resumes exactly.
    _name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [keys.tolist(), int(pos), int(has_gauss), float(cached)],
             "python": repr(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    import ast

    import torch

    torch.set_rng_state(state["torch"])
    keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    random.setstate(ast.literal_eval(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dir(workdir: Path, step: int) -> Path:
    return workdir / CHECKPOINTS / f"step-{step:06d}"


def save_checkpoint(workdir: Path, step: int, state: Mapping[str, Mapping[str, Any]], optimizer, lr_scheduler,
                    losses: Sequence[float], scores: Sequence[float]) -> Path:
    """Write LoRA + optimizer + schedule + RNG into a temp folder, then rename it into place."""
    import torch
    from safetensors.torch import save_file

    target = checkpoint_dir(workdir, step)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        save_file(flatten_state(state), str(tmp / "lora.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(), "rng": rng_state(),
                    "step": step, "losses": list(losses)}, tmp / "state.pt")
        (tmp / "meta.json").write_text(json.dumps({"step": step, "scores": list(scores),
                                                   "loss": float(np.mean(losses[-50:])) if losses else 0.0}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return target


def read_checkpoint_meta(path: Path) -> CheckpointRecord:
    meta = json.loads((path / "meta.json").read_text())
    return CheckpointRecord(int(meta["step"]), path, float(meta["loss"]), tuple(float(s) for s in meta["scores"]))


def completed_checkpoints(workdir: Path) -> list[CheckpointRecord]:
    root = workdir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in sorted(root.glob("step-*")) if (p / "meta.json").is_file() and (p / "state.pt").is_file()]
    return [read_checkpoint_meta(p) for p in found]


def read_lora_file(path: Path) -> dict[str, dict[str, Any]]:
    from safetensors.torch import load_file

    return unflatten_state(load_file(str(path)))


def run_params(policy: TrainPolicy, data: TrainData, total: int, base_model: str) -> dict[str, Any]:
    """What must match for a resume to continue the same run."""
    params = asdict(policy)
    params.pop("keep_checkpoints", None)
    return {"policy": params, "total_steps": total, "data": data.fingerprint(), "base_model": base_model}


def prepare_workdir(workdir: Path, params: dict[str, Any], resume: bool) -> list[CheckpointRecord]:
    """Start fresh, or check that the interrupted run in `workdir` is this one and list its checkpoints."""
    run_file = workdir / RUN_FILE
    jsonable = json.loads(json.dumps(params, default=str))
    if resume and run_file.is_file():
        previous = json.loads(run_file.read_text())
        if previous != jsonable:
            changed = sorted(k for k in jsonable if previous.get(k) != jsonable.get(k))
            raise BadInput(f"{run_file}: --resume with different {', '.join(changed)} than the interrupted run; "
                           "rerun with the same options or drop --resume")
        return completed_checkpoints(workdir)
    if workdir.exists():
        shutil.rmtree(workdir / CHECKPOINTS, ignore_errors=True)
    workdir.mkdir(parents=True, exist_ok=True)
    write_json(run_file, jsonable)
    return []


# --- validation and selection ---------------------------------------------------------


def validation_prompts(policy: TrainPolicy, trigger: str, class_word: str) -> list[str]:
    return [p.format(trigger=trigger, **{"class": class_word}) for p in policy.validation_prompts]


def render_validation(models: TrainModels, prompts: Sequence[str], policy: TrainPolicy, device: str) -> list[np.ndarray]:
    """Images from fixed seeds, so checkpoints are compared on equal terms."""
    import torch

    images = []
    for prompt in prompts:
        for seed in policy.validation_seeds:
            gen = torch.Generator(device="cpu").manual_seed(int(seed))
            out = models.pipeline(prompt=prompt, negative_prompt=policy.validation_negative, height=policy.resolution,
                                  width=policy.resolution, num_inference_steps=policy.validation_steps,
                                  guidance_scale=policy.validation_guidance, generator=gen, output_type="np")
            images.append((np.clip(out.images[0], 0, 1) * 255).round().astype(np.uint8))
    return images


def score_images(images: Sequence[np.ndarray], scorer: FaceScorer | None) -> tuple[float, ...]:
    if scorer is None:
        return ()
    scores = []
    for image in images:
        value = scorer(image)
        scores.append(0.0 if value is None or not math.isfinite(value) else max(float(value), 0.0))
    return tuple(scores)


def average_states(states: Sequence[Mapping[str, Mapping[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Element-wise mean of LoRA checkpoints, as EasyPhoto merges its best checkpoints.

    Averaging A and B separately is not the mean of the products B@A, but checkpoints of one
    run stay close, and this keeps the rank (a product average would need an SVD refit).
    """
    first = states[0]
    return {
        name: {key: sum(s[name][key] for s in states) / len(states) for key in first[name]}
        for name in first
    }


def choose_checkpoints(records: Sequence[CheckpointRecord], policy: TrainPolicy) -> tuple[str, list[CheckpointRecord]]:
    # A run whose validation images never show a face (tiny models, a broken base) has
    # nothing to rank by: keep the last weights rather than averaging noise.
    scored = [r for r in records if any(s > 0 for s in r.scores)]
    if policy.selection == "last" or not scored:
        return "last", [max(records, key=lambda r: r.step)]
    if policy.selection == "best":
        best = max(scored, key=lambda r: (r.score, r.step))
        return "best", [best]
    ranked = sorted(((s, r.step, r) for r in scored for s in r.scores), key=lambda t: (-t[0], -t[1]))
    chosen: dict[int, CheckpointRecord] = {}
    for _score, step, record in ranked[: policy.select_top_images]:
        chosen.setdefault(step, record)
    return "average", sorted(chosen.values(), key=lambda r: r.step)


# --- prior preservation ---------------------------------------------------------------


def class_images(models: TrainModels, prompt: str, policy: TrainPolicy, cache_dir: Path, device: str,
                 on_event: Callable[[TrainEvent], None] | None = None) -> tuple[np.ndarray, ...]:
    """Generate (once; cached as PNGs in `cache_dir`) the base model's images of the class."""
    import torch
    from PIL import Image

    from portrait.core.io import write_image

    cache_dir.mkdir(parents=True, exist_ok=True)
    images = []
    for i in range(policy.class_images):
        path = cache_dir / f"{i:04d}.png"
        if not path.is_file():
            if on_event:
                on_event(TrainEvent("class_images", i, policy.class_images))
            gen = torch.Generator(device="cpu").manual_seed(policy.seed * 10_007 + i)
            out = models.pipeline(prompt=prompt, height=policy.resolution, width=policy.resolution,
                                  num_inference_steps=policy.class_steps, generator=gen, output_type="np")
            write_image(path, (np.clip(out.images[0], 0, 1) * 255).round().astype(np.uint8))
        with Image.open(path) as im:
            images.append(np.asarray(im.convert("RGB")))
    return tuple(images)


# --- the loop -------------------------------------------------------------------------


@dataclass
class TrainingRun:
    """Everything the loop needs once setup is done: the models with their adapters, the caches,
    the optimizer and schedule. Built by `setup_training`; `step_loss` reads it."""

    models: TrainModels
    policy: TrainPolicy
    accelerator: Any
    weight_dtype: Any
    noise_scheduler: Any
    configs: dict[str, Any]
    param_groups: list[dict[str, Any]]
    optimizer: Any
    lr_scheduler: Any
    prompts: PromptCache
    instances: EncodedSet
    priors: EncodedSet | None
    n_images: int
    n_class_images: int
    scaling: float
    shift: float

    @property
    def device(self):
        return self.accelerator.device


def setup_training(models: TrainModels, data: TrainData, policy: TrainPolicy, total: int, *, device: str = "cpu",
                   dtype_name: str = "float32", emit: Callable[[TrainEvent], None] | None = None) -> TrainingRun:
    """Place the models, add the LoRA adapters, cache latents and prompts, build the optimizer."""
    import torch
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params

    mixed = mixed_precision_for(policy, device, dtype_name)
    accelerator = Accelerator(mixed_precision=mixed, cpu=not device.startswith("cuda"))
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed, torch.float32)
    for module in (models.unet, models.vae, *[enc for _n, _t, enc in models.text_encoders()]):
        module.requires_grad_(False)
        if module.dtype != weight_dtype or module.device != accelerator.device:
            module.to(accelerator.device, dtype=weight_dtype)

    configs = lora_configs(policy, models)
    add_adapters(models, configs, policy.seed)
    trainables = trained_modules(models, configs)
    for module in trainables.values():
        for name, p in module.named_parameters():
            p.requires_grad_("lora_" in name)
    # LoRA weights train in fp32 even when the frozen base runs in fp16 (diffusers does the same).
    cast_training_params(list(trainables.values()), dtype=torch.float32)
    if policy.gradient_checkpointing:
        models.unet.enable_gradient_checkpointing()
        for name in TEXT_COMPONENTS:
            if name in trainables:
                trainables[name].gradient_checkpointing_enable()
    # Attention already runs through torch's scaled_dot_product_attention (diffusers' default
    # AttnProcessor2_0), which picks flash / memory-efficient kernels on CUDA.

    if emit:
        emit(TrainEvent("cache", 0, total, message="encoding images and prompts once"))
    class_prompt = data.class_prompt or policy.class_prompt.format(**{"class": data.class_word})
    prompts = build_prompt_cache(models, list(data.captions) + ([class_prompt] if data.class_images else []),
                                 frozen=not policy.train_text_encoder, device=accelerator.device)
    instances = encode_set(models, data.images, data.captions, prompts, policy.resolution, accelerator.device)
    priors = (encode_set(models, data.class_images, [class_prompt] * len(data.class_images), prompts,
                         policy.resolution, accelerator.device) if data.class_images else None)
    park_idle(models, policy, accelerator.device, parked=True)

    groups = [{"params": [p for p in models.unet.parameters() if p.requires_grad], "lr": policy.learning_rate}]
    for name in TEXT_COMPONENTS:
        if name in trainables:
            groups.append({"params": [p for p in trainables[name].parameters() if p.requires_grad],
                           "lr": policy.text_encoder_lr})
    optimizer = make_optimizer(groups, policy, device)
    lr_scheduler = get_scheduler(policy.lr_scheduler, optimizer=optimizer, num_warmup_steps=policy.lr_warmup_steps,
                                 num_training_steps=total)
    optimizer, lr_scheduler = accelerator.prepare(optimizer, lr_scheduler)
    return TrainingRun(
        models=models, policy=policy, accelerator=accelerator, weight_dtype=weight_dtype,
        noise_scheduler=DDPMScheduler.from_config(models.pipeline.scheduler.config), configs=configs,
        param_groups=groups, optimizer=optimizer, lr_scheduler=lr_scheduler, prompts=prompts, instances=instances,
        priors=priors, n_images=len(data.images), n_class_images=len(data.class_images),
        scaling=float(models.vae.config.scaling_factor), shift=float(models.vae.config.get("shift_factor") or 0.0),
    )


def step_loss(run: TrainingRun, step: int):
    """The loss of training step `step`: its batch, flips, noise and timesteps depend only on (seed, step)."""
    import torch

    policy = run.policy
    gen = step_generator(policy.seed, step)
    idx = example_indices(run.n_images, policy.batch_size, step, policy.seed)
    flips = (torch.rand(len(idx), generator=gen) < 0.5) if policy.flip else torch.zeros(len(idx), dtype=torch.bool)
    latents, prompt_idx = sample_batch(run.instances, idx, flips, gen, run.scaling, run.shift)
    prior_count = 0
    if run.priors is not None:
        pidx = example_indices(run.n_class_images, policy.batch_size, step, policy.seed + 1)
        pflips = torch.rand(len(pidx), generator=gen) < 0.5
        plat, pprompt = sample_batch(run.priors, pidx, pflips, gen, run.scaling, run.shift)
        latents, prompt_idx, prior_count = torch.cat([latents, plat]), prompt_idx + pprompt, len(pidx)
    with run.accelerator.autocast():
        if run.prompts.embeds is not None:
            cond = run.prompts.embeds[prompt_idx]
            pooled = run.prompts.pooled[prompt_idx] if run.prompts.pooled is not None else None
        else:
            cond, pooled = encode_prompts(run.models, {k: v[prompt_idx] for k, v in run.prompts.token_ids.items()},
                                          run.device)
        return diffusion_loss(run.models, run.noise_scheduler, latents, cond, pooled, policy, gen, run.device,
                              run.weight_dtype, prior_count)


def optimize(run: TrainingRun, loss) -> None:
    run.accelerator.backward(loss)
    if run.accelerator.sync_gradients and run.policy.max_grad_norm:
        run.accelerator.clip_grad_norm_([p for g in run.param_groups for p in g["params"]], run.policy.max_grad_norm)
    run.optimizer.step()
    run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)


def restore_checkpoint(run: TrainingRun, record: CheckpointRecord) -> tuple[int, list[float]]:
    import torch

    load_lora_state(run.models, read_lora_file(record.path / "lora.safetensors"))
    state = torch.load(record.path / "state.pt", weights_only=True, map_location="cpu")
    run.optimizer.load_state_dict(state["optimizer"])
    run.lr_scheduler.load_state_dict(state["lr_scheduler"])
    restore_rng(state["rng"])
    return int(state["step"]), [float(x) for x in state["losses"]]


def train_lora(models: TrainModels, data: TrainData, policy: TrainPolicy, workdir: Path, *, device: str = "cpu",
               dtype_name: str = "float32", scorer: FaceScorer | None = None, resume: bool = False,
               base_model: str = "", on_event: Callable[[TrainEvent], None] | None = None) -> TrainResult:
    """Train, checkpoint, validate and select. The models come in loaded; `workdir` holds the run.

    Prior-preservation images (`data.class_images`) must come from the base model before any
    LoRA is added: make them with `class_images` first.
    """
    if not data.images:
        raise BadInput("no usable training photos")
    if len(data.images) != len(data.captions):
        raise PortraitError("training data: one caption per image is required")
    emit = on_event or (lambda event: None)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    total = policy.total_steps(len(data.images))
    params = run_params(policy, data, total, base_model)
    previous = prepare_workdir(Path(workdir), params, resume)

    t0 = time.perf_counter()
    run = setup_training(models, data, policy, total, device=device, dtype_name=dtype_name, emit=emit)
    timings["setup"] = time.perf_counter() - t0
    losses: list[float] = []
    start_step = 0
    if previous:
        start_step, losses = restore_checkpoint(run, max(previous, key=lambda r: r.step))
        emit(TrainEvent("resume", start_step, total, message=f"resuming at step {start_step}"))
    records = list(previous)
    checkpoints = set(policy.checkpoint_steps(total))
    val_prompts = validation_prompts(policy, data.trigger, data.class_word)

    t0 = time.perf_counter()
    models.unet.train()
    for step in range(start_step, total):
        loss = step_loss(run, step)
        optimize(run, loss)
        losses.append(float(loss.detach().item()))
        done = step + 1
        emit(TrainEvent("step", done, total, loss=losses[-1]))
        if done in checkpoints:
            scores = validate_checkpoint(models, val_prompts, policy, run.accelerator, scorer, emit, done, total)
            path = save_checkpoint(workdir, done, lora_state(models, run.configs), run.optimizer, run.lr_scheduler,
                                   losses, scores)
            records.append(read_checkpoint_meta(path))
    timings["train"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    how, chosen = choose_checkpoints(records, policy)
    states = [read_lora_file(r.path / "lora.safetensors") for r in chosen]
    final = average_states(states) if len(states) > 1 else states[0]
    load_lora_state(models, final)
    models.unet.eval()
    emit(TrainEvent("select", total, total, message=f"{how}: steps {', '.join(str(r.step) for r in chosen)}"))
    timings["select"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - started
    return TrainResult(
        lora=final,
        rank=policy.rank,
        alpha=float(policy.alpha),
        steps=total,
        losses=tuple(losses),
        checkpoints=tuple(sorted(records, key=lambda r: r.step)),
        selected=tuple(r.step for r in chosen),
        selection=how,
        timings={k: round(v, 3) for k, v in timings.items()},
        resumed_from=start_step,
        params=params,
    )


def validate_checkpoint(models, prompts, policy, accelerator, scorer, emit, step, total) -> tuple[float, ...]:
    import torch

    if scorer is None or not prompts or not policy.validation_seeds:
        return ()
    emit(TrainEvent("validate", step, total, message="rendering validation images"))
    models.unet.eval()
    park_idle(models, policy, accelerator.device, parked=False)
    try:
        with torch.no_grad(), accelerator.autocast():
            images = render_validation(models, prompts, policy, accelerator.device)
    finally:
        park_idle(models, policy, accelerator.device, parked=True)
        models.unet.train()
    return score_images(images, scorer)


def idle_modules(models: TrainModels, policy: TrainPolicy) -> list[Any]:
    """What a training step never touches once latents (and frozen prompts) are cached."""
    idle = [models.vae]
    if not policy.train_text_encoder:
        idle += [enc for _name, _tok, enc in models.text_encoders()]
    return idle


def park_idle(models: TrainModels, policy: TrainPolicy, device, parked: bool) -> None:
    """On CUDA, keep the idle modules in CPU memory between validations (SDXL's two text
    encoders are ~1.6 GB in fp16); on CPU there is nothing to gain."""
    if not str(device).startswith("cuda"):
        return
    import torch

    for module in idle_modules(models, policy):
        module.to("cpu" if parked else device)
    if parked:
        torch.cuda.empty_cache()


# --- export ---------------------------------------------------------------------------


def pipeline_class(family: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline


def adapter_metadata(policy_rank: int, alpha: float, targets: Sequence[str]) -> dict[str, Any]:
    from peft import LoraConfig

    return LoraConfig(r=policy_rank, lora_alpha=alpha, target_modules=list(targets)).to_dict()


def save_diffusers_lora(path: Path, family: str, lora: Mapping[str, Mapping[str, Any]], rank: int, alpha: float,
                        unet_targets: Sequence[str] = UNET_TARGETS, text_targets: Sequence[str] = TEXT_TARGETS) -> Path:
    """diffusers' own writer with the adapter config embedded, so `load_lora_weights` restores
    the real lora_alpha (without metadata it would assume alpha = rank)."""
    path = Path(path)
    kwargs: dict[str, Any] = {
        "unet_lora_layers": dict(lora["unet"]),
        "unet_lora_adapter_metadata": adapter_metadata(rank, alpha, unet_targets),
    }
    for name in TEXT_COMPONENTS:
        if name in lora:
            kwargs[f"{name}_lora_layers"] = dict(lora[name])
            kwargs[f"{name}_lora_adapter_metadata"] = adapter_metadata(rank, alpha, text_targets)
    with atomic_path(path) as tmp:
        folder = Path(tempfile.mkdtemp(prefix=".lora.", dir=path.parent))
        try:
            pipeline_class(family).save_lora_weights(str(folder), weight_name="lora.safetensors", **kwargs)
            os.replace(folder / "lora.safetensors", tmp)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    return path


def kohya_state(lora: Mapping[str, Mapping[str, Any]], family: str, alpha: float) -> dict[str, Any]:
    """A1111 / ComfyUI key names, with `.alpha` = the real lora_alpha.

    diffusers' convert_state_dict_to_kohya writes alpha = rank and, with transformers 5
    (no `text_model` wrapper), text-encoder keys those tools do not recognise; both are fixed here.
    """
    import torch
    from diffusers.utils import convert_state_dict_to_kohya

    flat = {f"{name}.{key}": value for name, part in lora.items() for key, value in part.items()}
    kohya = convert_state_dict_to_kohya(flat)
    te_prefix = {"lora_te1_": "lora_te_text_model_" if family != "sdxl" else "lora_te1_text_model_",
                 "lora_te2_": "lora_te2_text_model_"}
    out = {}
    for key, value in kohya.items():
        for old, new in te_prefix.items():
            if key.startswith(old) and not key.startswith(old + "text_model_"):
                key = new + key[len(old):]
                break
        if key.endswith(".alpha"):
            value = torch.tensor(float(alpha), dtype=torch.float32)
        out[key] = value.contiguous()
    return out


def save_kohya_lora(path: Path, family: str, lora: Mapping[str, Mapping[str, Any]], alpha: float,
                    metadata: Mapping[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    state = kohya_state(lora, family, alpha)
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=dict(metadata or {}))
    return Path(path)


def result_summary(result: TrainResult) -> dict[str, Any]:
    """The training record written into the bundle manifest."""
    # Mean loss over a window at each end; the window never covers more than half the run,
    # so a short run's first and last figures do not average the same steps.
    window = max(1, min(10, len(result.losses) // 2))
    return {
        "steps": result.steps,
        "rank": result.rank,
        "alpha": result.alpha,
        "resumed_from": result.resumed_from,
        "selection": result.selection,
        "selected_steps": list(result.selected),
        "final_loss": round(float(np.mean(result.losses[-window:])), 6) if result.losses else None,
        "first_loss": round(float(np.mean(result.losses[:window])), 6) if result.losses else None,
        "params": result.params,
    }


def validation_summary(result: TrainResult) -> list[dict[str, Any]]:
    return [{"step": r.step, "loss": round(r.loss, 6), "score": round(r.score, 4), "scores": [round(s, 4) for s in r.scores],
             "selected": r.step in result.selected} for r in result.checkpoints]


def discard_checkpoints(workdir: Path, keep: bool) -> None:
    if not keep:
        shutil.rmtree(Path(workdir) / CHECKPOINTS, ignore_errors=True)


__all__ = [
    "TrainPolicy", "TrainModels", "TrainData", "TrainEvent", "TrainResult", "CheckpointRecord", "FaceScorer",
    "TrainingRun", "setup_training", "step_loss", "optimize",
    "train_lora", "class_images", "save_diffusers_lora", "save_kohya_lora", "kohya_state", "average_states",
    "result_summary", "validation_summary", "discard_checkpoints",
]
