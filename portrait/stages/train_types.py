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
from portrait.core.formats.lora import TEXT_TARGETS, UNET_TARGETS

Optimizer = Literal["adamw", "adamw8bit", "prodigy"]
MixedPrecision = Literal["auto", "no", "fp16", "bf16"]
LearningRate = Annotated[float, Field(gt=0, le=10, allow_inf_nan=False)]


def _option(name: str, default: Any) -> Any:
    """A field that a `portrait train` option also sets: an override's error names the option."""
    return field(default=default, metadata={"option": name})


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
    checkpoint_every: Annotated[int, Field(ge=1)] = 100  # LoRA + optimizer + RNG, atomically; --resume continues from the last one
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


@dataclass(frozen=True)
class TrainModels:
    """The base model's components, taken from a loaded diffusers pipeline.

    The trainer adds a LoRA adapter to `pipeline.unet` (and text encoders), so pass a
    pipeline of its own, not one shared through the ModelCache with other work.
    """

    family: str  # sd15 | sdxl
    pipeline: Any
    # Loads fresh copies of the named components (vae, text_encoder, ...) of the same base.
    # With it, the trainer drops modules whose outputs are cached and reloads them for
    # validation renders; without it they stay in RAM (parked off the GPU on CUDA).
    reload: Callable[[Sequence[str]], Mapping[str, Any]] | None = None

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


@dataclass(frozen=True)
class CheckpointRecord:
    step: int
    path: Path
    loss: float  # mean training loss over the steps since the previous checkpoint
    scores: tuple[float, ...]  # one per validation image (0 where no face was found)

    @property
    def score(self) -> float:
        return float(np.mean(self.scores)) if self.scores else 0.0
