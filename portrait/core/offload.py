"""Carrying out a memory plan's strategy on loaded modules (portrait.core.memplan decides it).

- model offload: diffusers' `enable_model_cpu_offload` (one model of the chain on the device at a
  time; ControlNets hooked outside the chain stay once called, as the plan counts them);
- group offload: diffusers' `apply_group_offloading`, block level, one block per group, with a
  side stream on CUDA so the next block loads while one runs;
- sequential offload: accelerate's leaf-level hooks (`enable_sequential_cpu_offload`).

Modules a backend calls itself get the same treatment through `place_module` (InfiniteYou's
InfuseNet), and a submodule a backend calls directly, where no offload hook fires (InstantID's
Resampler is `unet.encoder_hid_proj`), runs on the execution device through
`on_execution_device` (docs/ARCHITECTURE.md#memory-plan).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

GROUP_OPTIONS = {"offload_type": "block_level", "num_blocks_per_group": 1}


def _group_enabled(module) -> bool:
    try:
        from diffusers.hooks.group_offloading import _is_group_offload_enabled
    except ImportError:  # an older diffusers: look for its hook registry
        return hasattr(module, "_diffusers_hook")
    return bool(_is_group_offload_enabled(module))


def group_offload(module, device: str) -> None:
    """Block-level group offloading of one module onto `device` (once; a shared module of several
    pipelines keeps the hooks it has)."""
    import torch
    from diffusers.hooks import apply_group_offloading

    if _group_enabled(module):
        return
    onload = torch.device(device)
    stream = onload.type == "cuda"
    if hasattr(module, "enable_group_offload"):
        module.enable_group_offload(onload_device=onload, use_stream=stream, **GROUP_OPTIONS)
    else:
        apply_group_offloading(module, onload_device=onload, use_stream=stream, **GROUP_OPTIONS)


def apply(pipe, placement) -> None:
    """The placement's strategy on a freshly built pipeline (its parts were left on the CPU)."""
    import torch

    strategy = getattr(placement, "strategy", "resident")
    if strategy in ("resident", "cpu") or getattr(pipe, "_portrait_strategy", None) == strategy:
        return
    if strategy == "model_offload":
        pipe.enable_model_cpu_offload(device=placement.device)
    elif strategy == "group_offload":
        for name, component in pipe.components.items():
            if isinstance(component, torch.nn.Module):
                if getattr(component, "_portrait_quantized", None):
                    component.to(placement.device)  # quanto's packed weights move whole
                else:
                    group_offload(component, placement.device)
    elif strategy == "sequential_offload":
        pipe.enable_sequential_cpu_offload(device=placement.device)
    else:
        raise ValueError(f"unknown offload strategy '{strategy}'")
    pipe._portrait_strategy = strategy


def place_module(module, placement) -> Any:
    """A module a backend runs itself beside the denoiser, placed as the plan counts it: on the
    device when resident or under model offload (it runs every step with the denoiser), block by
    block under group offload, leaf by leaf under sequential offload."""
    strategy = getattr(placement, "strategy", "resident")
    if getattr(module, "_portrait_placed", None) == (strategy, placement.device):
        return module
    if strategy in ("resident", "cpu", "model_offload") or getattr(module, "_portrait_quantized", None):
        module.to(placement.device)
    elif strategy == "group_offload":
        group_offload(module, placement.device)
    elif strategy == "sequential_offload":
        from accelerate import cpu_offload

        cpu_offload(module, execution_device=placement.device)
    module._portrait_placed = (strategy, placement.device)
    return module


@contextlib.contextmanager
def on_execution_device(module, device) -> Iterator[Any]:
    """Run `module` (a submodule a backend calls directly) on the execution device, then put it
    back. Under sequential offload its leaves carry hooks and meta weights: called as it is."""
    import torch

    params = list(module.parameters())
    target = torch.device(device)
    if not params or any(p.device.type == "meta" for p in params) or \
            all(p.device.type == target.type and (target.index is None or p.device.index == target.index)
                for p in params):
        yield module
        return
    where = params[0].device
    module.to(target)
    try:
        yield module
    finally:
        module.to(where)
