"""What the frontier backends share (FLUX.2 [klein], Z-Image, Qwen-Image-Edit): the checks a
request must pass (the FLUX.1 backends' too: stages/flux.py runs the same check), the base
pipeline, the pipeline arguments every call takes, and the identity LoRA of the family when the
bundle has one.

All three are flow-matching transformers sampled by FlowMatchEulerDiscreteScheduler (the
only sampler: `flow_euler`), at sizes of 16 px (VAE /8, then 2x2 patches), with one Qwen text
encoder. Their CFG differs: klein's distilled 4B has none (the base runs real CFG with
`guidance_scale`), Z-Image-Turbo runs at guidance 0 (Z-Image base uses CFG), and
Qwen-Image-Edit takes `true_cfg_scale` with a negative prompt. Each call's arguments are built
by one function per backend from the request and seed (`pipeline_args`), so a test can hand
the same arguments to diffusers' own pipeline (facts: docs/ARCHITECTURE.md#frontier-bases).
"""

from __future__ import annotations

from typing import Any, Sequence

from portrait.core.context import RunContext
from portrait.core.errors import BadInput
from portrait.core.types import GenerationRequest
from portrait.stages.sd import generator, prepare_pipeline

SAMPLER = "flow_euler"


def check_request(request: GenerationRequest, ctx: RunContext, families: Sequence[str], preset_hint: str) -> None:
    if ctx.preset.family not in families:
        raise BadInput(f"backend '{request.backend}' runs on {' or '.join(families)}; preset '{ctx.preset.name}' is "
                       f"{ctx.preset.family} (use --preset {preset_hint})")
    if request.scheduler != SAMPLER:
        raise BadInput(f"--scheduler {request.scheduler}: {ctx.preset.family} samples with {SAMPLER} only")
    if request.width % 16 or request.height % 16:
        raise BadInput(f"--size {request.width}x{request.height}: {ctx.preset.family} needs multiples of 16")


def max_sequence_length(ctx: RunContext) -> int:
    """The preset's generate.max_sequence_length (declared and bounded in GeneratePolicy)."""
    return int(ctx.preset.section("generate").get("max_sequence_length", 512))


def load_frontier_pipeline(ctx: RunContext, request: GenerationRequest, kind: str, role: str = "base"):
    """The preset's base as its diffusers pipeline of `kind`, with sampler and memory options set."""
    from portrait.core.loaders import load_pipeline

    pipe = load_pipeline(ctx, ctx.preset.model(role), kind=kind)
    prepare_pipeline(pipe, request, ctx)
    return pipe


def seeded(seed: int):
    """The generator of one candidate (on the CPU: the same noise on CPU and CUDA)."""
    return generator(seed)


def call(pipe, args: dict[str, Any]):
    """One pipeline call under inference mode; returns what the pipeline returns (images[0])."""
    import torch

    with torch.inference_mode():
        return pipe(**args).images


def reference_prompt(prompt: str, instruction: str, count: int, people: int = 1) -> str:
    """The prompt with the instruction that ties the picture to the reference images.

    `instruction` may use {images} ("the reference image" / "the reference images") and
    {person} ("person" / "people"); an empty instruction leaves the prompt as it is.
    """
    if not instruction:
        return prompt
    images = "the reference image" if count == 1 else "the reference images"
    text = instruction.replace("{images}", images).replace("{person}", "person" if people == 1 else "people")
    return f"{prompt.rstrip(' .')}. {text}".strip()
