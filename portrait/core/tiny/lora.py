"""A deterministic LoRA fill for reference checks.

peft starts a LoRA with B = 0, so the gradient of every A is zero at step 1 and a comparison
of one step with a reference would not see half the weights. Reference checks (the trainer's
flow-matching step against diffusers' scripts) overwrite every LoRA weight with the same
seeded values on both sides instead: a function of the parameter's name and shape only.
"""

from __future__ import annotations

import zlib

__all__ = ["fill_lora"]


def fill_lora(module, seed: int = 0, scale: float = 0.1) -> int:
    """Overwrite every `lora_` parameter of `module` with N(0, scale^2) values seeded by
    (seed, parameter name); returns how many were filled."""
    import torch

    count = 0
    with torch.no_grad():
        for name, param in sorted(module.named_parameters()):
            if "lora_" not in name:
                continue
            gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1))
            param.copy_((torch.randn(param.shape, generator=gen) * scale).to(param.dtype))
            count += 1
    return count
