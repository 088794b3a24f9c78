"""One training step of ours on a tiny flow-matching stand-in, set up the way
scripts/train_reference_step.py sets up diffusers' reference script for the same step.

Shared by the reference-step test (tests/test_train_flow_reference.py) and the script that
writes its fixtures, so both build the very same run: the preset's tiny train base, one
64 px photo, one prompt, rank 4 / alpha 2, no flips, batch 1, fp32, and every LoRA weight
overwritten with portrait.core.tiny.lora.fill_lora (non-zero B, so every gradient shows).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

# family -> (tiny preset, diffusers' script, extra script arguments)
FAMILIES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "flux": ("tiny-flux", "train_dreambooth_lora_flux.py", ("--guidance_scale", "3.5")),
    # The script's own default text layers (10, 20, 30) differ from the pipeline's (9, 18, 27),
    # which the pipeline renders with; we train on the pipeline's, and so must the reference.
    "flux2-klein": ("tiny-flux2-klein", "train_dreambooth_lora_flux2_klein.py",
                    ("--text_encoder_out_layers", "9", "18", "27")),
    "zimage": ("tiny-zimage", "train_dreambooth_lora_z_image.py", ()),
}
PROMPT = "a photo of sks person"
SEED = 0
RANK, ALPHA, LR, SEQUENCE = 4, 2.0, 1e-3, 128


def reference_image() -> np.ndarray:
    """A 64 x 64 RGB face crop (skimage's astronaut), at the training size so neither side resizes."""
    from PIL import Image
    from skimage import data

    return np.asarray(Image.fromarray(data.astronaut()[0:300, 100:400]).resize((64, 64), Image.LANCZOS))


def reference_policy(preset: str):
    from portrait.core.config import load_preset
    from portrait.stages.train import TrainPolicy

    return TrainPolicy.from_section(load_preset(preset).section("train"), steps=1, rank=RANK, alpha=ALPHA,
                                    learning_rate=LR, flip=False, batch_size=1, validation_seeds=[],
                                    checkpoint_every=1000, mixed_precision="no", max_sequence_length=SEQUENCE,
                                    seed=SEED, weighting_scheme="none", max_grad_norm=1.0)


def train_base_dir(settings, family: str) -> Path:
    """The tiny train base's diffusers folder (what the script's --pretrained_model_name_or_path names)."""
    from portrait.core.context import RunContext
    from portrait.flows.train import train_base

    ctx = RunContext.create(settings, preset=FAMILIES[family][0])
    return ctx.resolve(train_base(ctx)).root


def our_run(settings, family: str) -> tuple[Any, Any]:
    """(run, inputs): our FlowRun after setup with the filled LoRA and encoded caches, and the
    draws of its step 0 (noise, u, latent eps) that the reference is fed."""
    from portrait.core.cache import ModelCache
    from portrait.core.context import RunContext
    from portrait.core.loaders import load_pipeline
    from portrait.core.tiny.lora import fill_lora
    from portrait.flows.train import train_base
    from portrait.stages.train import TrainData, TrainModels
    from portrait.stages.train_flow import setup_flow_training, step_inputs

    preset = FAMILIES[family][0]
    ctx = RunContext.create(settings, preset=preset)
    pipe = load_pipeline(dataclasses.replace(ctx, cache=ModelCache()), train_base(ctx))
    models = TrainModels(family, pipe)
    data = TrainData((reference_image(),), (PROMPT,), "sks", "person")
    run = setup_flow_training(models, data, reference_policy(preset), total=1)
    fill_lora(models.denoiser, SEED)
    run.prefill(0)
    return run, step_inputs(run, 0)


def our_step(run, inputs) -> tuple[float, dict[str, Any]]:
    """Our loss and LoRA gradients (before clipping) for the given draws."""
    from portrait.stages.train_flow import flow_loss, lora_parameters

    run.models.denoiser.train()
    run.optimizer.zero_grad(set_to_none=True)
    loss = flow_loss(run, inputs)
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in lora_parameters(run.models.denoiser).items()}
    return float(loss.detach()), grads


def script_args(family: str, model_dir: Path, data_dir: Path, out_dir: Path) -> list[str]:
    """diffusers' script's command line for the same step (its defaults otherwise)."""
    return ["--pretrained_model_name_or_path", str(model_dir), "--instance_data_dir", str(data_dir),
            "--instance_prompt", PROMPT, "--output_dir", str(out_dir), "--resolution", "64",
            "--train_batch_size", "1", "--max_train_steps", "1", "--learning_rate", str(LR), "--rank", str(RANK),
            "--lora_alpha", str(int(ALPHA)), "--mixed_precision", "no", "--max_sequence_length", str(SEQUENCE),
            "--seed", str(SEED), "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
            "--weighting_scheme", "none", "--max_grad_norm", "1.0", *FAMILIES[family][2]]
