"""Validation and selection of training checkpoints, when to stop, and the training record of a bundle.

They follow EasyPhoto: each checkpoint renders a few images from fixed seeds
(`render_validation`), a face scorer rates their identity similarity (`score_images`), and the
final LoRA is the average of the checkpoints behind the best images, or the best single
checkpoint, or the last one, per preset (`choose_checkpoints`, `average_states`).

Two things EasyPhoto does not do. The run stops when likeness stops improving
(`stop_reason`): users of every trainer report that the right step count for a face is narrow
(kohya_ss #2701: good at 250 steps, worse by 500), so a fixed count either undertrains or
overfits; here `--steps` is only the ceiling. And likeness alone would reward a LoRA that
copies the photos (EasyPhoto #162: LoRAs overfit to frontal faces), so each validation also
measures prompt adherence (CLIP-T), and a checkpoint that lost more of it than
`clip_t_tolerance` against the base model (the step-0 baseline) is neither selected nor
counted as an improvement.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from portrait.stages.train_types import Baseline, CheckpointRecord, TrainModels, TrainPolicy, TrainResult


# A face scorer maps one generated RGB uint8 image to its identity similarity with the
# consensus, or None when it finds no face (which scores 0, never an error).
FaceScorer = Callable[[np.ndarray], "float | None"]
# A prompt scorer maps images and their prompts to prompt adherence (CLIP-T), one per image.
PromptScorer = Callable[[Sequence[np.ndarray], Sequence[str]], Sequence[float]]


def validation_prompts(policy: TrainPolicy, trigger: str, class_word: str) -> list[str]:
    return [p.format(trigger=trigger, **{"class": class_word}) for p in policy.validation_prompts]


def validation_call(models: TrainModels, policy: TrainPolicy) -> dict[str, Any]:
    """The pipeline arguments of a validation render that the family's pipeline takes: a FLUX.2
    [klein] pipeline has no negative prompt, the flow-matching ones render with the text length
    (and klein's hidden layers) they trained on."""
    import inspect

    wanted: dict[str, Any] = {"negative_prompt": policy.validation_negative, "height": policy.resolution,
                              "width": policy.resolution, "num_inference_steps": policy.validation_steps,
                              "guidance_scale": policy.validation_guidance, "output_type": "np"}
    if models.denoiser_name == "transformer":
        wanted["max_sequence_length"] = policy.max_sequence_length
        if policy.text_encoder_out_layers:
            wanted["text_encoder_out_layers"] = tuple(policy.text_encoder_out_layers)
    accepted = inspect.signature(type(models.pipeline).__call__).parameters
    return {k: v for k, v in wanted.items() if k in accepted}


def render_validation(models: TrainModels, prompts: Sequence[str], policy: TrainPolicy, device: str) -> list[np.ndarray]:
    """Images from fixed seeds, so checkpoints are compared on equal terms."""
    import torch

    images = []
    call = validation_call(models, policy)
    for prompt in prompts:
        for seed in policy.validation_seeds:
            gen = torch.Generator(device="cpu").manual_seed(int(seed))
            out = models.pipeline(prompt=prompt, generator=gen, **call)
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


def keeps_the_prompt(record: CheckpointRecord, policy: TrainPolicy, baseline: Baseline | None) -> bool:
    """False when the checkpoint lost more prompt adherence (CLIP-T) than the policy tolerates
    against the base model: it paints the training photos, whatever the prompt says."""
    if policy.clip_t_tolerance is None or baseline is None:
        return True
    floor, now = baseline.prompt_score, record.prompt_score
    return floor is None or now is None or now >= floor - policy.clip_t_tolerance


def stop_reason(records: Sequence[CheckpointRecord], policy: TrainPolicy, baseline: Baseline | None = None) -> str:
    """Why the run should stop after its latest validation, or "" to go on.

    It stops when the held-out likeness has not gained `min_delta` over its best for `patience`
    validations, or has fallen more than `max_drop` below the best. A checkpoint that lost the
    prompt (see keeps_the_prompt) never counts as a gain. Nothing stops a run before some
    validation image showed a face: a score of 0 there means "no face yet", not a plateau.
    """
    scored = sorted((r for r in records if r.scores), key=lambda r: r.step)
    if not policy.early_stop or not any(s > 0 for r in scored for s in r.scores):
        return ""
    best: CheckpointRecord | None = None
    since = 0
    for record in scored:
        if keeps_the_prompt(record, policy, baseline) and (best is None or record.score > best.score + policy.min_delta):
            best, since = record, 0
        else:
            since += 1
    if best is None:
        return ""
    last = scored[-1]
    if last.score < best.score - policy.max_drop:
        return (f"likeness fell from {best.score:.3f} (step {best.step}) to {last.score:.3f} (step {last.step}), "
                f"more than max_drop {policy.max_drop:g}")
    if since >= policy.patience:
        return (f"no likeness gain of {policy.min_delta:g} in {since} validation(s) since step {best.step} "
                f"({best.score:.3f}; patience {policy.patience})")
    return ""


def choose_checkpoints(records: Sequence[CheckpointRecord], policy: TrainPolicy,
                       baseline: Baseline | None = None) -> tuple[str, list[CheckpointRecord]]:
    # A run whose validation images never show a face (tiny models, a broken base) has
    # nothing to rank by: keep the last weights rather than averaging noise.
    scored = [r for r in records if any(s > 0 for s in r.scores)]
    # Checkpoints that copy the photos (CLIP-T fallen below the base model's) are not candidates,
    # unless every scored one does (then likeness alone decides, and the manifest shows why).
    kept = [r for r in scored if keeps_the_prompt(r, policy, baseline)]
    scored = kept or scored
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
        "max_steps": result.max_steps or result.steps,
        "stopped_early": bool(result.stop_reason),
        "stop_reason": result.stop_reason or None,
        "rank": result.rank,
        "alpha": result.alpha,
        "targets": list(result.targets),
        "resumed_from": result.resumed_from,
        "selection": result.selection,
        "selected_steps": list(result.selected),
        "final_loss": round(float(np.mean(result.losses[-window:])), 6) if result.losses else None,
        "first_loss": round(float(np.mean(result.losses[:window])), 6) if result.losses else None,
        "params": result.params,
    }


def _mean(values: Sequence[float]) -> float | None:
    return round(float(np.mean(values)), 4) if values else None


def validation_summary(result: TrainResult) -> list[dict[str, Any]]:
    """The likeness curve: one row per validation, the base model's (step 0) first.

    `score` is the mean held-out likeness of the fixed-seed renders, `clip_t` their mean prompt
    adherence; `keeps_prompt` is False for a checkpoint that lost the prompt (not selectable)."""
    rows: list[dict[str, Any]] = []
    tolerance = (result.params.get("policy") or {}).get("clip_t_tolerance")
    floor = result.baseline.prompt_score if result.baseline is not None else None
    if result.baseline is not None:
        rows.append({"step": 0, "loss": None, "score": round(result.baseline.score, 4),
                     "scores": [round(s, 4) for s in result.baseline.scores], "clip_t": _mean(result.baseline.clip_t),
                     "selected": False, "baseline": True})
    for r in result.checkpoints:
        rows.append({"step": r.step, "loss": round(r.loss, 6), "score": round(r.score, 4),
                     "scores": [round(s, 4) for s in r.scores], "clip_t": _mean(r.clip_t),
                     "keeps_prompt": not (tolerance is not None and floor is not None and r.prompt_score is not None
                                          and r.prompt_score < floor - tolerance),
                     "selected": r.step in result.selected})
    return rows


__all__ = ["FaceScorer", "PromptScorer", "validation_prompts", "validation_call", "render_validation", "score_images",
           "average_states", "keeps_the_prompt", "stop_reason", "choose_checkpoints", "result_summary",
           "validation_summary"]
