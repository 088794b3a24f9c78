"""The seeded candidate loop every backend runs: seeds request.seed, request.seed + 1, ...

A candidate records its own one-seed request, so any image can be regenerated alone; the
setup (loading) time is charged to the first candidate. It lives apart from the generate
stage so a backend never imports the module that dispatches to it.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from portrait.core.types import Candidate, GenerationRequest


def candidate_seeds(request: GenerationRequest) -> list[int]:
    return [(request.seed + i) % 2**32 for i in range(request.n)]


def with_seed(request: GenerationRequest, seed: int, n: int = 1) -> GenerationRequest:
    return replace(request, seed=seed, n=n)


def seeded_candidates(request: GenerationRequest, render: Callable[[int], np.ndarray], *, setup_seconds: float,
                      info: Mapping[str, Any], render_batch: Callable[[list[int]], list[np.ndarray]] | None = None,
                      batch_size: int = 1) -> Iterator[Candidate]:
    """One candidate per seed of the request, `render(seed)` making each image.

    Every backend's loop: time each image, charge the setup (loading) to the first one, and
    record the seed's own request so a candidate can be regenerated alone. A backend that can
    render several seeds in one call passes `render_batch(seeds)` (one image per seed, each
    equal to its `render(seed)` within float tolerance) and the `batch_size` that fits memory;
    the seeds then go in chunks of that size, and each image is charged its share of its chunk.
    """
    seeds = candidate_seeds(request)
    size = max(1, int(batch_size)) if render_batch is not None else 1
    first = True
    for start in range(0, len(seeds), size):
        chunk = seeds[start:start + size]
        started = time.perf_counter()
        images = render_batch(chunk) if len(chunk) > 1 else [render(chunk[0])]
        if len(images) != len(chunk):
            raise RuntimeError(f"batched render returned {len(images)} images for {len(chunk)} seeds")
        share = (time.perf_counter() - started) / len(chunk)
        for seed, image in zip(chunk, images):
            timings = {"generate": share}
            if first:
                timings["load"] = setup_seconds
                first = False
            yield Candidate(image=image, seed=seed, request=with_seed(request, seed, request.n), timings=timings,
                            info=dict(info))
