"""Identity LoRA training: DreamBooth-style LoRA on the denoiser (and optionally the text encoders).

Inputs: the base pipeline's components (`TrainModels`), the prepared images and captions
(`TrainData`), a `TrainPolicy` from the preset's `train` section, and a work folder.
Output: a `TrainResult` holding the selected LoRA weights, every checkpoint's validation
scores (the likeness curve), the loss curve and timings.

The family decides the loop (`LOOPS`): SD1.5 and SDXL train a UNet LoRA with the DDPM loss here;
FLUX.1 [dev], FLUX.2 [klein] and Z-Image train a transformer LoRA with the flow-matching loss of
diffusers' reference scripts (stages/train_flow.py). Everything around the step is shared.

Why it is fast: the VAE latents and, when the text encoders are frozen, the text embeddings
are computed once each, all before step 1 (`TrainingRun.prefill`); a mirror is encoded only if
a flip ever draws it, and a step costs only the denoiser's forward and backward. diffusers'
train_dreambooth_lora.py runs the VAE and text encoder on every step instead
(bench/train_speed.py measures the difference).

Why it is small: the draws of every step are a pure function of (seed, step), so the run
knows in advance which latents and prompts it will ever need; once they are cached the VAE
and the frozen text encoders leave the device, and leave RAM when the caller can reload them
(`TrainModels.reload`) for validation renders. A training step holds the denoiser alone.

Why it is resumable: every `checkpoint_every` steps the LoRA, the optimizer, the LR
schedule and the RNG states are written atomically (a temp folder renamed into place), and
all randomness of step k comes from a generator seeded by (seed, k), so a run killed at any
point and resumed from its last checkpoint reproduces the uninterrupted run on CPU.

Validation and selection follow EasyPhoto: each checkpoint renders a few images from fixed
seeds, a face scorer rates their likeness (held-out photos, an independent space) and CLIP-T
their prompt adherence; the run stops when likeness stops improving (`--steps` is the ceiling),
and the final LoRA is the average of the checkpoints behind the best images (or the best
single checkpoint, per preset) among those that kept the prompt.

This module is the loop (values, setup, caches, one step, the run). Around it:
stages/train_flow.py (the flow-matching step), stages/train_state.py (work folder,
checkpoints, RNG states), stages/train_select.py (validation renders, scoring, stopping,
checkpoint choice, the manifest's training record), stages/train_prior.py (prior-preservation
class images) and portrait/core/formats/lora.py (the LoRA files). Their public names are
re-exported here, so `portrait.stages.train` stays the one import for the train flow.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from portrait.core.errors import BadInput, PortraitError
from portrait.core.formats.lora import kohya_state, read_lora_file, save_diffusers_lora, save_kohya_lora  # noqa: F401
from portrait.stages.train_flow import flow_step_loss, setup_flow_training
from portrait.stages.train_prior import class_images  # noqa: F401
from portrait.stages.train_run import (LatentCache, Precision, PromptCache, Residency, StepDraws,  # noqa: F401
                                       TrainingRun, add_adapters, check_runtime, denoiser_targets, diffusion_loss,
                                       encode_image, encode_prompts, example_indices, gradient_checkpointing_for,
                                       images_to_tensor, load_dtypes, load_lora_state, lora_configs, lora_state,
                                       make_optimizer, mixed_precision_for, optimize, optimizer_available,
                                       prompt_cache, setup_training, step_draws, step_generator, step_loss, time_ids,
                                       tokenize, trained_modules)
from portrait.stages.train_select import (FaceScorer, PromptScorer, average_states, choose_checkpoints,  # noqa: F401
                                          render_validation, result_summary, score_images, stop_reason,
                                          validation_prompts, validation_summary)
from portrait.stages.train_state import (TrainEvent, completed_checkpoints, discard_checkpoints,  # noqa: F401
                                         prepare_workdir, read_baseline, read_checkpoint_meta, restore_rng, run_params,
                                         save_baseline, save_checkpoint)
from portrait.stages.train_types import (FLOW_LOOP, LOOPS, TEXT_ENCODERS, UNET_LOOP, Baseline,  # noqa: F401
                                         CheckpointRecord, LearningRate, MixedPrecision, Optimizer, TrainData,
                                         TrainModels, TrainPolicy, TrainResult, check_trainable)


def restore_checkpoint(run: TrainingRun, record: CheckpointRecord) -> tuple[int, list[float]]:
    """Load a checkpoint's LoRA, optimizer, LR schedule and RNG states into the run (state.pt is
    the run's own file, read weights-only); returns (its step, the losses up to it)."""
    import torch

    load_lora_state(run.models, read_lora_file(record.path / "lora.safetensors"))
    state = torch.load(record.path / "state.pt", weights_only=True, map_location="cpu")
    run.optimizer.load_state_dict(state["optimizer"])
    run.lr_scheduler.load_state_dict(state["lr_scheduler"])
    restore_rng(state["rng"])
    return int(state["step"]), [float(x) for x in state["losses"]]


def train_lora(models: TrainModels, data: TrainData, policy: TrainPolicy, workdir: Path, *, device: str = "cpu",
               dtype_name: str = "float32", scorer: FaceScorer | None = None, prompt_scorer: PromptScorer | None = None,
               resume: bool = False, base_model: str = "", on_event: Callable[[TrainEvent], None] | None = None,
               restore_pipeline: bool = True) -> TrainResult:
    """Train, checkpoint, validate, stop when likeness stops improving, and select. The models
    come in loaded; `workdir` holds the run. The family picks the loop: the UNet loop of this
    module for SD1.5/SDXL, stages/train_flow.py for the flow-matching transformers.

    `scorer` rates a validation image's likeness (held-out photos, an independent space: the
    train flow builds it), `prompt_scorer` its prompt adherence (CLIP-T). Prior-preservation
    images (`data.class_images`) must come from the base model before any LoRA is added: make
    them with `class_images` first. `restore_pipeline=False` leaves the modules the trainer
    dropped (see Residency) dropped: for callers done with the pipeline.
    """
    if not data.images:
        raise BadInput("no usable training photos")
    if len(data.images) != len(data.captions):
        raise PortraitError("training data: one caption per image is required")
    loop = check_trainable(models.family)
    check_runtime(policy, device, dtype_name, models.family)
    emit = on_event or (lambda event: None)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    total = policy.total_steps(len(data.images))
    params = run_params(policy, data, total, base_model)
    # The precision `auto` resolved to on this machine: a resume elsewhere (another CPU, a GPU)
    # that would train in another precision is refused rather than silently mixed.
    params["precision"] = mixed_precision_for(policy, device, dtype_name, unet_dtype=models.denoiser.dtype)
    previous = prepare_workdir(Path(workdir), params, resume)

    t0 = time.perf_counter()
    if loop == UNET_LOOP:
        run, one_step = setup_training(models, data, policy, total, device=device, dtype_name=dtype_name), step_loss
    else:
        run = setup_flow_training(models, data, policy, total, device=device, dtype_name=dtype_name)
        one_step = flow_step_loss
    timings["setup"] = time.perf_counter() - t0
    val_prompts = validation_prompts(policy, data.trigger, data.class_word)
    # The base model's figures (step 0 of the curve), before any training: the new LoRA's
    # B matrices are zero, so this render is the base model's own.
    baseline = read_baseline(workdir)
    if baseline is None and scorer is not None and val_prompts and policy.validation_seeds:
        scores, clips = validate_checkpoint(run, val_prompts, scorer, prompt_scorer, emit, 0)
        baseline = Baseline(scores, clips)
        save_baseline(workdir, baseline)
    losses: list[float] = []
    start_step = 0
    if previous:
        start_step, losses = restore_checkpoint(run, max(previous, key=lambda r: r.step))
        emit(TrainEvent("resume", start_step, total, message=f"resuming at step {start_step}"))
    # Every latent and prompt embedding the remaining steps will draw, encoded before step 1;
    # then the VAE and frozen text encoders leave (a step holds the denoiser alone).
    t0 = time.perf_counter()
    emit(TrainEvent("cache", start_step, total, message="encoding photos and prompts"))
    run.prefill(start_step)
    timings["cache"] = time.perf_counter() - t0
    records = list(previous)
    checkpoints = set(policy.checkpoint_steps(total))
    stopped = stop_reason(records, policy, baseline)  # a resumed run that had already decided to stop

    t0 = time.perf_counter()
    models.denoiser.train()
    for step in range(start_step, total):
        if stopped:
            break
        loss = one_step(run, step)
        optimize(run, loss)
        losses.append(float(loss.detach().item()))
        done = step + 1
        emit(TrainEvent("step", done, total, loss=losses[-1]))
        if done in checkpoints:
            scores, clips = validate_checkpoint(run, val_prompts, scorer, prompt_scorer, emit, done)
            path = save_checkpoint(workdir, done, lora_state(models, run.configs), run.optimizer, run.lr_scheduler,
                                   losses, scores, clips)
            records.append(read_checkpoint_meta(path))
            if scores:
                emit(TrainEvent("scores", done, total, message=curve_line(records[-1])))
            stopped = stop_reason(records, policy, baseline)
            if stopped:
                emit(TrainEvent("stop", done, total, message=stopped))
    timings["train"] = time.perf_counter() - t0
    steps_run = max(r.step for r in records) if stopped else total

    t0 = time.perf_counter()
    how, chosen = choose_checkpoints(records, policy, baseline)
    states = [read_lora_file(r.path / "lora.safetensors") for r in chosen]
    final = average_states(states) if len(states) > 1 else states[0]
    load_lora_state(models, final)
    models.denoiser.eval()
    if restore_pipeline:
        run.residency.need(run.idle_names())
        for name, dtype in run.given_dtypes.items():
            module = getattr(models.pipeline, name)
            if module.dtype != dtype:
                module.to(dtype=dtype)
    emit(TrainEvent("select", steps_run, total, message=f"{how}: steps {', '.join(str(r.step) for r in chosen)}"))
    timings["select"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - started
    return TrainResult(
        lora=final,
        rank=policy.rank,
        alpha=float(policy.alpha),
        steps=steps_run,
        losses=tuple(losses[:steps_run]),
        checkpoints=tuple(sorted(records, key=lambda r: r.step)),
        selected=tuple(r.step for r in chosen),
        selection=how,
        timings={k: round(v, 3) for k, v in timings.items()},
        resumed_from=start_step,
        params=params,
        max_steps=total,
        stop_reason=stopped,
        baseline=baseline,
        targets=denoiser_targets(policy, models.family),
    )


def curve_line(record: CheckpointRecord) -> str:
    clip = f", CLIP-T {record.prompt_score:.3f}" if record.prompt_score is not None else ""
    return f"step {record.step}: likeness {record.score:.3f}{clip}"


def validate_checkpoint(run: TrainingRun, prompts, scorer, prompt_scorer, emit, step) -> tuple[tuple[float, ...],
                                                                                                tuple[float, ...]]:
    """Render the fixed-seed validation images and score them: (likeness, CLIP-T) per image.
    The dropped modules come back for the render and go again."""
    import torch

    policy, models = run.policy, run.models
    if scorer is None or not prompts or not policy.validation_seeds:
        return (), ()
    emit(TrainEvent("validate", step, run.total, message="rendering validation images"))
    models.denoiser.eval()
    run.residency.need(run.idle_names())
    try:
        with torch.no_grad(), run.precision.autocast():
            images = render_validation(models, prompts, policy, run.device)
    finally:
        run.release_done()
        models.denoiser.train()
    clips: tuple[float, ...] = ()
    if prompt_scorer is not None:
        per_image = [p for p in prompts for _seed in policy.validation_seeds]
        clips = tuple(float(c) for c in prompt_scorer(images, per_image))
    return score_images(images, scorer), clips


__all__ = [
    "TrainPolicy", "TrainModels", "TrainData", "TrainEvent", "TrainResult", "CheckpointRecord", "FaceScorer",
    "PromptScorer", "Baseline", "TrainingRun", "setup_training", "step_loss", "optimize", "check_runtime",
    "check_trainable", "LOOPS", "denoiser_targets", "stop_reason",
    "train_lora", "class_images", "save_diffusers_lora", "save_kohya_lora", "kohya_state", "average_states",
    "result_summary", "validation_summary", "discard_checkpoints", "completed_checkpoints", "choose_checkpoints",
    "score_images", "read_lora_file",
]
