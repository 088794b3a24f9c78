"""Test helpers for generation: a tiny identity bundle made the way `portrait train` writes one.

Kept separate from conftest.py (shared) so the generate tests own their fixture; once the
trainer lands, its bundles go through the same loader (portrait.core.bundle).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_tiny_identity(settings, name: str, reference: np.ndarray, *, seed: int = 0, family: str = "sd15",
                        base_id: str = "tiny-sd15", rank: int = 4, alpha: float = 4.0) -> Path:
    """An identity bundle with a random (non-zero) peft LoRA on the tiny UNet, saved like the trainer does."""
    import torch
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict
    from PIL import Image

    from portrait.core.bundle import identity_dir, write_manifest

    root = identity_dir(settings, name)
    root.mkdir(parents=True, exist_ok=True)
    unet_dir = settings.models_dir / base_id / "unet"
    variant = "fp16" if (unet_dir / "diffusion_pytorch_model.fp16.safetensors").is_file() else None
    unet = UNet2DConditionModel.from_pretrained(unet_dir, variant=variant, torch_dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                        init_lora_weights=True)
    unet.add_adapter(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, param in sorted(unet.named_parameters()):
            if "lora_" in pname:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    pipeline_cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    pipeline_cls.save_lora_weights(root, unet_lora_layers=get_peft_model_state_dict(unet),
                                              weight_name="lora.safetensors",
                                              unet_lora_adapter_metadata=config.to_dict())
    Image.fromarray(reference).save(root / "reference.png")
    write_manifest(root, {
        "name": name, "trigger": "sks", "class_word": "person", "preset": "tiny",
        "reference": "reference.png", "photos": [],
        "loras": {family: {"file": "lora.safetensors", "base_model": base_id, "rank": rank, "alpha": alpha}},
    })
    return root
