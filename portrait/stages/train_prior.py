"""Prior preservation (DreamBooth): images of the class drawn by the base model itself.

Generated once per (base, resolution, steps, seed, prompt) into a cache folder the train flow
names, as PNGs, and read back with the one image reader; the loop mixes them into the batches
with the prior-loss weight of the preset.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from portrait.stages.train_state import TrainEvent

from portrait.stages.train_types import TrainModels, TrainPolicy


def class_images(models: TrainModels, prompt: str, policy: TrainPolicy, cache_dir: Path, device: str,
                 on_event: Callable[[TrainEvent], None] | None = None) -> tuple[np.ndarray, ...]:
    """Generate (once; cached as PNGs in `cache_dir`) the base model's images of the class."""
    import torch

    from portrait.core.formats.images import read_rgb, write_image

    cache_dir.mkdir(parents=True, exist_ok=True)
    # Under CPU bf16 training the denoiser and text encoders are bf16 and the VAE fp32: autocast
    # lets the pipeline pass latents between them (as the trainer's validation renders do).
    denoiser, vae = models.denoiser, models.pipeline.vae
    mixed = denoiser.dtype != vae.dtype
    images = []
    for i in range(policy.class_images):
        path = cache_dir / f"{i:04d}.png"
        if not path.is_file():
            if on_event:
                on_event(TrainEvent("class_images", i, policy.class_images))
            gen = torch.Generator(device="cpu").manual_seed(policy.seed * 10_007 + i)
            with torch.autocast(torch.device(device).type, dtype=denoiser.dtype, enabled=mixed):
                out = models.pipeline(prompt=prompt, height=policy.resolution, width=policy.resolution,
                                      num_inference_steps=policy.class_steps, generator=gen, output_type="np")
            write_image(path, (np.clip(out.images[0], 0, 1) * 255).round().astype(np.uint8))
        images.append(read_rgb(path))
    return tuple(images)


__all__ = ["class_images"]
