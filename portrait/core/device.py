"""Device and precision choice, in one place so every stage agrees.

CPU runs fp32 (fp16 matmuls on CPU are slow or unsupported); CUDA runs fp16, or bf16 when
the card supports it and the preset asks for it. Offload is decided from free VRAM.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from .errors import BadInput


@dataclass(frozen=True)
class Placement:
    device: str  # "cpu" | "cuda" | "cuda:N"
    dtype_name: str  # "float32" | "float16" | "bfloat16"
    offload: bool = False  # enable_model_cpu_offload instead of .to(device)

    @property
    def dtype(self):
        import torch

        return getattr(torch, self.dtype_name)

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")


def resolve_device(requested: str = "auto") -> str:
    import torch

    if requested not in ("auto", "cpu") and not requested.startswith("cuda"):
        raise BadInput(f"--device: '{requested}' is not one of auto, cpu, cuda, cuda:N")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise BadInput(f"--device {requested}: no CUDA device is visible to torch")
    return requested


def placement(requested: str = "auto", precision: str = "auto", min_vram_gb: float = 0.0) -> Placement:
    """Pick device, dtype and offload. `min_vram_gb` is what the pipeline needs resident."""
    device = resolve_device(requested)
    if device == "cpu":
        return Placement("cpu", "float32", offload=False)
    import torch

    if precision == "auto":
        dtype = "float16"
    elif precision in ("float16", "fp16"):
        dtype = "float16"
    elif precision in ("bfloat16", "bf16"):
        dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    else:
        dtype = "float32"
    index = torch.device(device).index or 0
    free, _total = torch.cuda.mem_get_info(index)
    return Placement(device, dtype, offload=min_vram_gb > 0 and free / 2**30 < min_vram_gb)


@functools.lru_cache(maxsize=8)  # read once per process: the trainer asks at load, setup and resume
def cpu_bf16_native(cpuinfo: str | None = None) -> bool:
    """Whether this CPU does bf16 arithmetic in hardware: x86 AVX512-BF16 or AMX-BF16 (Zen 4,
    Cooper Lake, Sapphire Rapids and later), or Arm's BF16 extension. Without them torch
    emulates bf16 and it is slower than fp32. Read from /proc/cpuinfo (Linux; `cpuinfo` is its
    text, for tests); elsewhere False.

    Measured on this 2-core EPYC (avx512_bf16, no AMX), SD1.5 UNet, 256 px, one thread: a LoRA
    training step (forward + backward, bf16 frozen weights under autocast) 3.7 s against 7.0 s
    in fp32.
    """
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags = set(value.split())
            return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    return False
