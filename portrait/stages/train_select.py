"""Validation and selection of training checkpoints, and the training record of a bundle.

They follow EasyPhoto: each checkpoint renders a few images from fixed seeds
(`render_validation`), a face scorer rates their identity similarity (`score_images`), and the
final LoRA is the average of the checkpoints behind the best images, or the best single
checkpoint, or the last one, per preset (`choose_checkpoints`, `average_states`).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from portrait.stages.train_state import CheckpointRecord

from portrait.stages.train_types import TrainModels, TrainPolicy, TrainResult

# A face scorer maps one generated RGB uint8 image to its identity similarity with the
# consensus, or None when it finds no face (which scores 0, never an error).
FaceScorer = Callable[[np.ndarray], "float | None"]


def validation_prompts(policy: TrainPolicy, trigger: str, class_word: str) -> list[str]:
    return [p.format(trigger=trigger, **{"class": class_word}) for p in policy.validation_prompts]


def render_validation(models: TrainModels, prompts: Sequence[str], policy: TrainPolicy, device: str) -> list[np.ndarray]:
    """Images from fixed seeds, so checkpoints are compared on equal terms."""
    import torch

    images = []
    for prompt in prompts:
        for seed in policy.validation_seeds:
            gen = torch.Generator(device="cpu").manual_seed(int(seed))
            out = models.pipeline(prompt=prompt, negative_prompt=policy.validation_negative, height=policy.resolution,
                                  width=policy.resolution, num_inference_steps=policy.validation_steps,
                                  guidance_scale=policy.validation_guidance, generator=gen, output_type="np")
            images.append((np.clip(out.images[0], 0, 1) * 255).round().astype(np.uint8))
    return images


def score_images(images: Sequence[np.ndarray], scorer: FaceScorer | None) -> tuple[float, ...]:
    if scorer is None:
        return ()
    scores = []
    for image in images:
        value = scorer(image)
        scores.append(0.0 if value is None or not math.isfinite(value) else max(float(value), 0.0))
    return tuple(scores)


def average_states(states: Sequence[Mapping[str, Mapping[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Element-wise mean of LoRA checkpoints, as EasyPhoto merges its best checkpoints.

    Averaging A and B separately is not the mean of the products B@A, but checkpoints of one
    run stay close, and this keeps the rank (a product average would need an SVD refit).
    """
    first = states[0]
    return {
        name: {key: sum(s[name][key] for s in states) / len(states) for key in first[name]}
        for name in first
    }


def choose_checkpoints(records: Sequence[CheckpointRecord], policy: TrainPolicy) -> tuple[str, list[CheckpointRecord]]:
    # A run whose validation images never show a face (tiny models, a broken base) has
    # nothing to rank by: keep the last weights rather than averaging noise.
    scored = [r for r in records if any(s > 0 for s in r.scores)]
    if policy.selection == "last" or not scored:
        return "last", [max(records, key=lambda r: r.step)]
    if policy.selection == "best":
        best = max(scored, key=lambda r: (r.score, r.step))
        return "best", [best]
    ranked = sorted(((s, r.step, r) for r in scored for s in r.scores), key=lambda t: (-t[0], -t[1]))
    chosen: dict[int, CheckpointRecord] = {}
    for _score, step, record in ranked[: policy.select_top_images]:
        chosen.setdefault(step, record)
    return "average", sorted(chosen.values(), key=lambda r: r.step)


def result_summary(result: TrainResult) -> dict[str, Any]:
    """The training record written into the bundle manifest."""
    # Mean loss over a window at each end; the window never covers more than half the run,
    # so a short run's first and last figures do not average the same steps.
    window = max(1, min(10, len(result.losses) // 2))
    return {
        "steps": result.steps,
        "rank": result.rank,
        "alpha": result.alpha,
        "resumed_from": result.resumed_from,
        "selection": result.selection,
        "selected_steps": list(result.selected),
        "final_loss": round(float(np.mean(result.losses[-window:])), 6) if result.losses else None,
        "first_loss": round(float(np.mean(result.losses[:window])), 6) if result.losses else None,
        "params": result.params,
    }


def validation_summary(result: TrainResult) -> list[dict[str, Any]]:
    return [{"step": r.step, "loss": round(r.loss, 6), "score": round(r.score, 4), "scores": [round(s, 4) for s in r.scores],
             "selected": r.step in result.selected} for r in result.checkpoints]


__all__ = ["FaceScorer", "validation_prompts", "render_validation", "score_images", "average_states",
           "choose_checkpoints", "result_summary", "validation_summary"]
