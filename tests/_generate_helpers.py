"""Test helpers for generation: a tiny identity bundle made the way `portrait train` writes one.

Kept separate from conftest.py (shared) so the generate tests own their fixture; the bundle is
written by the trainer's own writer (portrait.core.bundle.write_bundle) and read by its loader.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_tiny_identity(settings, name: str, reference: np.ndarray, *, seed: int = 0, family: str = "sd15",
                        base_id: str = "tiny-sd15", rank: int = 4, alpha: float = 4.0) -> Path:
    """An identity bundle with a random (non-zero) peft LoRA on the tiny UNet, saved like the trainer does."""
    import torch
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict

    from portrait.core.bundle import BundleLora, identity_dir, write_bundle

    root = identity_dir(settings, name)
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
    write_bundle(root, {"name": name, "trigger": "sks", "class_word": "person", "preset": "tiny"},
                 reference=reference,
                 lora=BundleLora(family, {"unet": get_peft_model_state_dict(unet)}, rank, alpha, base_model=base_id))
    return root
