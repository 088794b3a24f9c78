"""Tiny LoRA stand-ins that fit the tiny UNets: LCM-LoRA (few-step mode) and a style LoRA.

The real LCM-LoRAs (latent-consistency/lcm-lora-sdv1-5, -sdxl) ship one file,
`pytorch_lora_weights.safetensors`, in the kohya layout with diffusers module names
(`lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight` / `.lora_up.weight` /
`.alpha`), covering attention, proj_in/out, feed-forward, resnet convs and time embeddings.
These write the same layout at rank 4 through peft + diffusers' own kohya converter, so
`pipe.load_lora_weights` takes the same code path for both. Same seed, same bytes.
"""

from __future__ import annotations

from pathlib import Path

LCM_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
               "conv1", "conv2", "time_emb_proj"]
STYLE_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
FILE = "pytorch_lora_weights.safetensors"


def _unet(family: str):
    from . import diffusion

    parts = diffusion.sd15_parts(0) if family == "sd15" else diffusion.sdxl_parts(0)
    return parts["unet"]


def kohya_lora_state(family: str, seed: int, targets: list[str], rank: int = 4, alpha: float = 8.0,
                     std: float = 0.05) -> dict:
    """A random LoRA on the tiny UNet of `family`, as kohya keys with the real alpha."""
    import torch
    from diffusers.utils import convert_state_dict_to_kohya
    from peft import LoraConfig, get_peft_model_state_dict

    unet = _unet(family)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=True))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        # peft zero-initialises lora_B (a no-op LoRA); random B makes the stand-in matter.
        for name, param in sorted(unet.named_parameters()):
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    peft_state = {f"unet.{k}": v for k, v in get_peft_model_state_dict(unet).items()}
    state = convert_state_dict_to_kohya(peft_state)
    # The converter writes alpha = rank; the real files carry their true alpha (docs/ARCHITECTURE.md#lora-files).
    for key in [k for k in state if k.endswith(".alpha")]:
        state[key] = torch.tensor(float(alpha))
    return {k: v.detach().to(torch.float16 if k.endswith("weight") else torch.float32).contiguous()
            for k, v in sorted(state.items())}


def _save(path: Path, state: dict) -> None:
    from portrait.core.formats.lora import write_safetensors

    write_safetensors(path, state, {"format": "pt"})


def write_lcm_lora_sd15(root: Path, seed: int) -> None:
    _save(root / FILE, kohya_lora_state("sd15", seed, LCM_TARGETS, rank=4, alpha=8.0))


def write_lcm_lora_sdxl(root: Path, seed: int) -> None:
    _save(root / FILE, kohya_lora_state("sdxl", seed, LCM_TARGETS, rank=4, alpha=8.0))


def write_style_lora_sd15(root: Path, seed: int) -> None:
    _save(root / "style.safetensors", kohya_lora_state("sd15", seed, STYLE_TARGETS, rank=4, alpha=4.0, std=0.2))
