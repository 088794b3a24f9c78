"""Candidates per second: `generate --n 8` rendered in one batched call vs one call per seed.

The lora backend renders a request's candidates through `stages.sd.call_pipeline_batch` (a
generator per seed, so each image equals its single-seed render within float tolerance);
before, it called the pipeline once per seed. This bench times both on the same pipeline,
prompt, size, sampler and seeds, alternating them `--repeats` times, with the torch thread
count pinned, and prints images/s for each and the ratio (median of the paired runs). It also
prints the largest pixel difference between a batched image and its single-seed render.

    python bench/generate_batch.py                       # tiny preset, 64 px
    python bench/generate_batch.py --arch sd15           # SD1.5 architecture, random weights, 256 px
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))


def request_for(n: int, size: int, steps: int):
    from portrait.core.types import GenerationRequest

    # call_pipeline reads the prompt, sizes, steps and guidance; no identity is needed here.
    return GenerationRequest(identity=None, backend="lora", template=None,  # type: ignore[arg-type]
                             prompt="professional headshot photo of a person, studio light",
                             negative_prompt="blurry, lowres", width=size, height=size, steps=steps, guidance=7.0,
                             scheduler="dpmpp_2m_karras", seed=1, n=n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=("tiny", "sd15"), default="tiny")
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default 3 tiny, 4 sd15)")
    parser.add_argument("--size", type=int, default=None, help="image size (default 64 tiny, 256 sd15)")
    parser.add_argument("--repeats", type=int, default=None, help="alternating pairs (default 3 tiny, 1 sd15)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--home", default=None, help="HOME with the models (default: a temp home)")
    args = parser.parse_args()
    real = args.arch == "sd15"
    args.steps = args.steps or (4 if real else 3)
    args.size = args.size or (256 if real else 64)
    args.repeats = args.repeats or (1 if real else 3)

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from portrait.core.loaders import make_scheduler
    from portrait.stages.sd import call_pipeline, call_pipeline_batch

    with tempfile.TemporaryDirectory() as tmp:
        home = Path(args.home) if args.home else Path(tmp)
        if real:
            from diffusers import StableDiffusionPipeline

            from train_speed import write_sd15_architecture

            pipe = StableDiffusionPipeline.from_pretrained(write_sd15_architecture(home), safety_checker=None,
                                                           requires_safety_checker=False)
        else:
            from portrait.core.config import Settings
            from portrait.core.context import RunContext
            from portrait.core.loaders import load_pipeline
            from train_speed import ensure_tiny

            ensure_tiny(home, "tiny")
            pipe = load_pipeline(RunContext.create(Settings(home=home, preset="tiny", device="cpu"), preset="tiny"))
        pipe.set_progress_bar_config(disable=True)
        request = request_for(args.n, args.size, args.steps)
        pipe.scheduler = make_scheduler(request.scheduler, pipe.scheduler.config)
        seeds = [request.seed + i for i in range(args.n)]
        call_pipeline(pipe, request, 0)  # warm-up: first-call allocations and kernel choice

        single_s, batch_s = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            singles = [call_pipeline(pipe, request, s) for s in seeds]
            single_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            batched = call_pipeline_batch(pipe, request, seeds)
            batch_s.append(time.perf_counter() - t0)
        diff = max(int(np.abs(a.astype(int) - b.astype(int)).max()) for a, b in zip(singles, batched))

    ratio = statistics.median(s / b for s, b in zip(single_s, batch_s))
    one, many = args.n / statistics.median(single_s), args.n / statistics.median(batch_s)
    print(f"{args.arch} architecture, {args.size} px, {args.steps} steps, --n {args.n}, {args.threads} thread(s), "
          f"{args.repeats} alternating pair(s); load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"one call per seed: {one:.3f} images/s; batched ({args.n} per call): {many:.3f} images/s; "
          f"ratio {ratio:.2f}x (median of pairs); largest pixel difference batched vs single: {diff}/255")


if __name__ == "__main__":
    main()
