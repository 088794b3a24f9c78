"""Per-image time of `portrait generate` (lora backend) vs a bare diffusers pipeline call.

Both sides run the same tiny SD1.5 model with the same identity LoRA, prompt, sampler
(DPM++ 2M Karras), steps and size, warm (one untimed image first). Ours is the whole
flow per image: request resolution, LoRA stack switching, the pipeline call, PNG writing
with both metadata chunks and results.json; finishing is off (it is its own stage). The
baseline is `pipe(...)` in a loop. Target: ratio <= 1.10.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/generate_overhead.py [--n 8] [--steps 20] [--size 128]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _bundle(settings) -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from _generate_helpers import write_tiny_identity
    from skimage import data

    write_tiny_identity(settings, "bench", data.astronaut())
    return "bench"


def ours_runner(settings, name: str, steps: int, size: int, out: Path):
    """One image through the whole flow per call (request, LoRA stack, pipeline, PNG + results.json)."""
    from portrait.core.context import RunContext
    from portrait.flows.generate import generate

    ctx = RunContext.create(settings, preset="tiny")
    kwargs = dict(prompt="portrait photo of {trigger} {class}", n=1, ctx=ctx, finish=False, steps=steps,
                  width=size, height=size, scheduler="dpmpp_2m_karras", guidance=7.0)

    def one(seed: int) -> float:
        started = time.perf_counter()
        generate(name, seed=seed, out=out / f"ours-{seed}", **kwargs)
        return time.perf_counter() - started

    return one


def bare_runner(settings, name: str, steps: int, size: int):
    """The same image from a bare diffusers pipeline with the same LoRA, sampler, steps and size."""
    import torch
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(settings.models_dir / "tiny-sd15", safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++",
                                                             use_karras_sigmas=True)
    pipe.load_lora_weights(str(settings.identities_dir / name / "lora.safetensors"), adapter_name="id")
    pipe.set_adapters(["id"], adapter_weights=[0.9])

    def one(seed: int) -> float:
        started = time.perf_counter()
        pipe("portrait photo of sks person", num_inference_steps=steps, guidance_scale=7.0, width=size, height=size,
             generator=torch.Generator().manual_seed(seed), output_type="np")
        return time.perf_counter() - started

    return one


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps a shared CPU steady)")
    args = parser.parse_args()

    import torch

    from portrait.core.config import Settings
    from portrait.core.registry import make_tiny

    torch.set_num_threads(args.threads)
    home = Path(tempfile.mkdtemp(prefix="portrait-bench-"))
    settings = Settings(home=home, preset="tiny", device="cpu")
    make_tiny(settings, only=["tiny-sd15", "tiny-sd15-vae"])
    name = _bundle(settings)
    ours, bare = ours_runner(settings, name, args.steps, args.size, home / "out"), \
        bare_runner(settings, name, args.steps, args.size)
    ours(0), bare(0)  # warm: first calls build pipelines and load the LoRA
    # Interleaved, so a busy machine slows both sides alike; medians drop the outliers.
    ours_times, bare_times = [], []
    for i in range(args.n):
        ours_times.append(ours(100 + i))
        bare_times.append(bare(100 + i))
    ours_s, bare_s = float(np.median(ours_times)), float(np.median(bare_times))
    print(f"tiny sd15 + identity LoRA, {args.steps} steps, {args.size}x{args.size}, {args.n} images, "
          f"{args.threads} thread(s)")
    print(f"ours (portrait generate, lora backend): {ours_s * 1000:8.1f} ms/image (median)")
    print(f"bare diffusers pipeline call:          {bare_s * 1000:8.1f} ms/image (median)")
    print(f"ratio ours/bare: {ours_s / bare_s:.3f} (target <= 1.10)")
    assert np.isfinite(ours_s / bare_s)


if __name__ == "__main__":
    main()
