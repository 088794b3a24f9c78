"""The trainer's values (policy, models, data, checkpoints, result), below the modules that use them.

The loop (train.py), its checkpoints and RNG state (train_state.py), checkpoint selection
(train_select.py) and prior images (train_prior.py) all read these; they live here so none of
those modules imports another to name them (no import cycle, lazy or not).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, ClassVar, Literal, Mapping, Sequence

import numpy as np
from pydantic import Field

from portrait.core.declare import policy_from
from portrait.core.errors import BadInput
from portrait.core.formats.lora import TEXT_TARGETS, UNET_TARGETS

Optimizer = Literal["adamw", "adamw8bit", "prodigy"]
MixedPrecision = Literal["auto", "no", "fp16", "bf16"]
LearningRate = Annotated[float, Field(gt=0, le=10, allow_inf_nan=False)]


def _option(name: str, default: Any) -> Any:
    """A field that a `portrait train` option also sets: an override's error names the option."""
    return field(default=default, metadata={"option": name})


# --- values ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainPolicy:
    """The `train` section of a preset (the declaration: type, default, bounds). Every key is
    overridable; the ones `portrait train` takes as options name the option in their errors."""

    SECTION: ClassVar[str] = "train"

    rank: Annotated[int, Field(ge=1)] = _option("--rank", 32)  # LoRA rank (EasyPhoto 128, FaceChain 4)
    alpha: Annotated[float, Field(gt=0, allow_inf_nan=False)] = _option("--alpha", 16.0)  # lora_alpha; the LoRA's scale is alpha / rank
    learning_rate: LearningRate = _option("--lr", 1e-4)  # UNet LoRA (EasyPhoto 1e-4); Prodigy: 1.0
    text_encoder_lr: LearningRate = _option("--text-encoder-lr", 5e-5)
    train_text_encoder: bool = _option("--train-text-encoder", False)  # EasyPhoto trains it; costs one text-encoder pass per step
    lr_scheduler: str = "constant"  # a diffusers get_scheduler name
    lr_warmup_steps: Annotated[int, Field(ge=0)] = 0
    steps: Annotated[int, Field(ge=1)] | None = _option("--steps", None)  # explicit step count; else steps_per_photo x photos, clamped
    steps_per_photo: Annotated[int, Field(ge=1)] = 100  # steps = clamp(steps_per_photo x photos, min_steps, max_steps)
    min_steps: Annotated[int, Field(ge=1)] = 200
    max_steps: Annotated[int, Field(ge=1)] = 800  # EasyPhoto: min(200 x photos, 800)
    batch_size: Annotated[int, Field(ge=1, le=64)] = _option("--batch-size", 1)  # images per step
    resolution: Annotated[int, Field(ge=64, le=2048, multiple_of=8)] = _option("--resolution", 512)  # px, the prepare crops' size (the VAE works in 8-pixel blocks)
    flip: bool = True  # mirrored copies, cached with the originals
    snr_gamma: Annotated[float, Field(ge=0)] | None = None  # Min-SNR loss weighting; null or 0 = plain MSE
    noise_offset: Annotated[float, Field(ge=0)] = 0.0
    max_grad_norm: Annotated[float, Field(gt=0)] = 1.0
    gradient_checkpointing: Literal[True, False, "auto"] = _option("--gradient-checkpointing", "auto")  # auto: on CUDA with < 16 GB; never on CPU (it costs a forward)
    optimizer: Optimizer = _option("--optimizer", "adamw")  # adamw (fused) | adamw8bit (bitsandbytes) | prodigy (prodigyopt; learning-rate free, use lr 1.0)
    mixed_precision: MixedPrecision = _option("--mixed-precision", "auto")  # auto (fp16/bf16 per runtime.precision on CUDA; on CPU bf16 where it has bf16 instructions, else fp32) | no | fp16 | bf16
    seed: int = 0
    unet_targets: tuple[str, ...] = UNET_TARGETS  # UNet modules that get a LoRA
    text_targets: tuple[str, ...] = TEXT_TARGETS  # text-encoder modules that get a LoRA
    checkpoint_every: Annotated[int, Field(ge=1)] = 100  # the validation interval N: every N steps the LoRA + optimizer + RNG are saved atomically (--resume continues from the last one) and validated
    validation_prompts: tuple[str, ...] = ("a close-up photo of {trigger} {class}, looking at the camera",)  # rendered at each checkpoint with fixed seeds, scored by face similarity
    validation_negative: str = "blurry, lowres, deformed"
    validation_seeds: tuple[int, ...] = (1, 2)
    validation_steps: Annotated[int, Field(ge=1)] = 20
    validation_guidance: Annotated[float, Field(ge=0)] = 6.0
    selection: Literal["average", "best", "last"] = "average"  # average (EasyPhoto: mean of the checkpoints behind the best images) | best | last
    select_top_images: Annotated[int, Field(ge=1)] = 10  # average the checkpoints behind the best N validation images
    prior_preservation: bool = False  # DreamBooth class images from the base model (cached in HOME/cache)
    prior_loss_weight: Annotated[float, Field(ge=0)] = 1.0
    class_images: Annotated[int, Field(ge=0)] = 50
    class_prompt: str = "a photo of a {class}"
    class_steps: Annotated[int, Field(ge=1)] = 25
    keep_checkpoints: bool = False  # keep HOME/identities/.NAME.work after a successful run
    # --- stopped by likeness (every family) ---
    early_stop: bool = True  # stop when the held-out likeness stops improving (--steps stays the ceiling)
    patience: Annotated[int, Field(ge=1)] = 2  # validations without a gain of min_delta before stopping
    min_delta: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.005  # the smallest likeness gain that counts as one
    max_drop: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.05  # a fall of more than this below the best stops at once
    clip_t_tolerance: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = 0.02  # a checkpoint whose CLIP-T falls more than this below the base model's is not selected (it copies the photos); null = off
    holdout: Annotated[int, Field(ge=0)] = 1  # photos kept out of training to score likeness on (only when holdout_min_train photos remain to train)
    holdout_min_train: Annotated[int, Field(ge=1)] = 4
    # --- flow-matching families (flux, flux2-klein, zimage), as diffusers' scripts name them ---
    transformer_targets: tuple[str, ...] | None = None  # transformer modules with a LoRA; null = the family's reference script's default
    weighting_scheme: Literal["none", "logit_normal", "mode", "sigma_sqrt", "cosmap"] = "none"  # timestep density / loss weighting (the scripts' --weighting_scheme)
    logit_mean: Annotated[float, Field(allow_inf_nan=False)] = 0.0  # logit_normal's mean
    logit_std: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1.0  # logit_normal's std
    mode_scale: Annotated[float, Field(allow_inf_nan=False)] = 1.29  # the `mode` density's scale
    guidance_scale: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 3.5  # the distilled guidance a transformer with a guidance embedding trains at (FLUX.1-dev; the scripts' --guidance_scale)
    max_sequence_length: Annotated[int, Field(ge=1, le=4096)] = 512  # text tokens (T5 / Qwen3), in training and validation renders
    text_encoder_out_layers: tuple[int, ...] | None = None  # FLUX.2 [klein]: the Qwen3 hidden layers stacked into the text embedding; null = the pipeline's (9, 18, 27)

    @classmethod
    def from_section(cls, section: Mapping[str, Any], where: str = "preset train", **overrides: Any) -> "TrainPolicy":
        return policy_from(cls, section, where, overrides=overrides)

    def total_steps(self, n_photos: int) -> int:
        """EasyPhoto's rule: steps grow with the photo count, clamped to a range."""
        if self.steps is not None:
            return int(self.steps)
        return int(min(max(self.steps_per_photo * n_photos, self.min_steps), self.max_steps))

    def checkpoint_steps(self, total: int) -> list[int]:
        steps = list(range(self.checkpoint_every, total + 1, self.checkpoint_every))
        return steps if steps and steps[-1] == total else steps + [total]


# Which loop trains each family, the module that carries its LoRA, and its text encoders (the
# component names of its diffusers pipeline). A family missing here cannot train a LoRA:
# `check_trainable` says so in one line before any work.
UNET_LOOP, FLOW_LOOP = "unet", "flow-matching"
LOOPS: dict[str, str] = {"sd15": UNET_LOOP, "sdxl": UNET_LOOP, "flux": FLOW_LOOP, "flux2-klein": FLOW_LOOP,
                         "zimage": FLOW_LOOP}
TEXT_ENCODERS: dict[str, tuple[str, ...]] = {
    "sd15": ("text_encoder",), "sdxl": ("text_encoder", "text_encoder_2"),
    "flux": ("text_encoder", "text_encoder_2"),  # CLIP-L (pooled) + T5 (sequence)
    "flux2-klein": ("text_encoder",), "zimage": ("text_encoder",),  # Qwen3
}


def check_trainable(family: str, preset: str = "") -> str:
    """The loop that trains `family`; a family without one is refused in one line (exit 2)."""
    loop = LOOPS.get(family)
    if loop is None:
        where = f"preset '{preset}' is family {family}" if preset else f"family {family}"
        raise BadInput(f"{where}, which portrait cannot train a LoRA for (trainable: {', '.join(LOOPS)}); "
                       "use a zero-shot backend, or train on a preset of a trainable family")
    return loop


@dataclass(frozen=True)
class TrainModels:
    """The base model's components, taken from a loaded diffusers pipeline.

    The trainer adds a LoRA adapter to the denoiser (`pipeline.unet` for SD, `pipeline.transformer`
    for the flow-matching families) and optionally the text encoders, so pass a pipeline of its
    own, not one shared through the ModelCache with other work.
    """

    family: str  # a key of LOOPS
    pipeline: Any
    # Loads fresh copies of the named components (vae, text_encoder, ...) of the same base.
    # With it, the trainer drops modules whose outputs are cached and reloads them for
    # validation renders; without it they stay in RAM (parked off the GPU on CUDA).
    reload: Callable[[Sequence[str]], Mapping[str, Any]] | None = None

    @property
    def loop(self) -> str:
        return check_trainable(self.family)

    @property
    def denoiser_name(self) -> str:
        return "unet" if self.loop == UNET_LOOP else "transformer"

    @property
    def denoiser(self):
        return getattr(self.pipeline, self.denoiser_name)

    @property
    def unet(self):
        return self.pipeline.unet

    @property
    def vae(self):
        return self.pipeline.vae

    def encoder_names(self) -> tuple[str, ...]:
        return TEXT_ENCODERS[self.family]

    def text_encoders(self) -> list[tuple[str, Any, Any]]:
        """(component name, tokenizer, encoder) for each text encoder the family uses."""
        return [(name, getattr(self.pipeline, name.replace("text_encoder", "tokenizer"), None),
                 getattr(self.pipeline, name)) for name in self.encoder_names()]


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
class TrainResult:
    lora: dict[str, dict[str, Any]]  # component -> peft state dict (torch tensors, fp32, CPU)
    rank: int
    alpha: float
    steps: int  # the steps trained (fewer than max_steps when likeness stopped the run)
    losses: tuple[float, ...]
    checkpoints: tuple[CheckpointRecord, ...]
    selected: tuple[int, ...]  # the checkpoint steps merged into `lora`
    selection: str
    timings: dict[str, float]
    resumed_from: int = 0
    params: dict[str, Any] = field(default_factory=dict)
    max_steps: int = 0  # the ceiling (--steps, or the preset's rule by photo count)
    stop_reason: str = ""  # why likeness stopped the run early; empty when it ran to max_steps
    baseline: Baseline | None = None  # the base model's validation figures, before any training
    targets: tuple[str, ...] = ()  # the denoiser modules that carry the LoRA


@dataclass(frozen=True)
class CheckpointRecord:
    step: int
    path: Path
    loss: float  # mean training loss over the steps since the previous checkpoint
    scores: tuple[float, ...]  # one per validation image (0 where no face was found)
    clip_t: tuple[float, ...] = ()  # prompt adherence (CLIP-T) per validation image; empty when not measured

    @property
    def score(self) -> float:
        return float(np.mean(self.scores)) if self.scores else 0.0

    @property
    def prompt_score(self) -> float | None:
        return float(np.mean(self.clip_t)) if self.clip_t else None


@dataclass(frozen=True)
class Baseline:
    """The base model's validation figures before any training (the curve's step 0): the floor
    a LoRA's likeness is measured from, and the prompt adherence it must not lose."""

    scores: tuple[float, ...]
    clip_t: tuple[float, ...] = ()

    @property
    def score(self) -> float:
        return float(np.mean(self.scores)) if self.scores else 0.0

    @property
    def prompt_score(self) -> float | None:
        return float(np.mean(self.clip_t)) if self.clip_t else None
