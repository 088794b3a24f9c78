"""`portrait train`: prepare -> train a LoRA -> validate and select -> write the Identity bundle.

Where things go (HOME = settings.home):

    HOME/identities/.NAME.work/      the run: prepare output, run.json, checkpoints/ (resume reads it)
    HOME/identities/.NAME.staging/   the bundle being written
    HOME/identities/NAME/            the finished bundle (see portrait/core/bundle.py), swapped in
                                     by a rename only once every file is complete

So an interrupted run never leaves a half bundle, and `--resume` finds its checkpoints.
Ctrl-C or SIGTERM end the run with Interrupted (exit 130 / 143) and one line saying which step
it reached and which checkpoint is kept. One process at a time owns a name: the run holds
HOME/identities/.NAME.lock (portrait.core.lock); a second one is refused, naming the holder.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from portrait.core.bundle import BundleLora, check_name, identity_dir, load_identity, read_manifest, update_manifest
from portrait.core.bundle import write_bundle as write_bundle_files
from portrait.core.cache import ModelCache
from portrait.core.config import Settings
from portrait.core.context import RunContext
from portrait.core.errors import ENVIRONMENT_ERRNOS, BadInput, Interrupted, OutputFailed
from portrait.core.declare import from_preset
from portrait.core.interrupt import signal_of
from portrait.core.formats.images import read_rgb
from portrait.core.io import discard_dir, publish_dir, sync_tree
from portrait.core.lock import identity_lock
from portrait.core.types import Identity, TrainingSet
from portrait.stages.train import (
    FaceScorer,
    TrainData,
    TrainEvent,
    TrainModels,
    TrainPolicy,
    TrainResult,
    check_runtime,
    class_images,
    discard_checkpoints,
    load_dtypes,
    result_summary,
    train_lora,
    validation_summary,
)

EventSink = Callable[[TrainEvent], None]
# `ss_base_model_version` as kohya's trainers write it, which A1111 / Forge / ComfyUI UIs show.
KOHYA_BASE_NAMES = {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0", "flux": "flux1", "flux2-klein": "flux2_klein",
                    "zimage": "z_image"}
VERSIONED_PACKAGES = ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "insightface",
                      "dlib", "numpy")


def train(photos: Sequence[str | Path] | str | Path, name: str, *, settings: Settings | None = None,
          preset: str | None = None, steps: int | None = None, rank: int | None = None, resume: bool = False,
          overwrite: bool = False, zero_shot: bool = False, ctx: RunContext | None = None,
          progress: Callable[[str, float, float], None] | None = None, on_event: EventSink | None = None,
          wait: bool = False, **train_options: Any) -> Identity:
    """Learn `name` from `photos` and write HOME/identities/NAME. Returns the loaded Identity.

    Refuses (BadInput, exit 2) an existing name unless `overwrite`, too few usable photos, and
    a name another process is training (unless `wait`); an unwritable home is OutputFailed (exit 4).
    `resume` continues the interrupted run of the same name and options.
    `train_options` override the preset's train section (see `policy_overrides`): resolution,
    batch_size, lr, rank, alpha, train_text_encoder, optimizer, gradient_checkpointing,
    mixed_precision; None keeps the preset's value.
    """
    ctx = ctx or RunContext.create(settings, preset=preset, progress=progress)
    settings = ctx.settings
    check_name(name)
    overrides = policy_overrides(steps=steps, rank=rank, **train_options)
    ensure_writable(settings.identities_dir)
    reached = {"step": 0, "total": 0}

    def emit(event: TrainEvent) -> None:
        if event.phase in ("step", "resume"):
            reached.update(step=event.step, total=event.total)
        if on_event:
            on_event(event)

    work = settings.identities_dir / f".{name}.work"
    with identity_lock(settings.identities_dir, name, wait=wait):
        try:
            return _train_locked(ctx, photos, name, overrides=overrides, resume=resume, overwrite=overwrite,
                                 zero_shot=zero_shot, progress=progress, emit=emit)
        except KeyboardInterrupt as exc:
            raise Interrupted(interrupted_message(name, work, reached), signal_of(exc)) from None


def interrupted_message(name: str, work: Path, reached: dict[str, int]) -> str:
    """What an interrupted run kept, in one line."""
    from portrait.stages.train import completed_checkpoints

    try:
        kept = max((r.step for r in completed_checkpoints(work)), default=0)
    except Exception:  # noqa: BLE001 - a half-written checkpoint: say nothing is kept rather than fail here
        kept = 0
    if not reached["step"]:
        return f"train '{name}' stopped before training started; nothing kept (run the same command again)"
    where = f"stopped at step {reached['step']} of {reached['total']}"
    if kept:
        return f"train '{name}' {where}; checkpoint at step {kept} kept in {work}; resume with --resume"
    return f"train '{name}' {where}, before the first checkpoint; nothing to resume (run the same command again)"


def _train_locked(ctx: RunContext, photos, name: str, *, overrides: dict[str, Any], resume, overwrite, zero_shot,
                  progress, emit: EventSink) -> Identity:
    settings = ctx.settings
    target = identity_dir(settings, name)
    if (target / "manifest.json").exists() and not overwrite:
        raise BadInput(f"{target}: identity '{name}' already exists; pass --overwrite to replace it")
    # Every setting is checked before any work starts.
    policy: TrainPolicy | None = None
    if not zero_shot:
        # Types and bounds against the declaration (a `learning_rate: fast` would fail deep in torch).
        policy = from_preset(TrainPolicy, ctx.preset, overrides=overrides)
        # The family decides the loop; one that has none is refused here, before any work.
        check_runtime(policy, ctx.placement.device, ctx.placement.dtype_name, ctx.preset.family, ctx.preset.name)
    work = settings.identities_dir / f".{name}.work"
    if not resume and work.exists():
        shutil.rmtree(work)
    timings: dict[str, float] = {}
    started = time.perf_counter()

    from portrait.core.licenses import preflight
    from portrait.flows.prepare import prepare

    if not zero_shot:  # a license policy refuses the base before any work
        preflight(ctx.registry, [train_base(ctx)], settings.license)
    with ctx.registry.recording() as used:
        t0 = time.perf_counter()
        emit(TrainEvent("prepare", 0, 0, message="analysing photos"))
        prepared = prepare(photos, work / "prepare", ctx=ctx, progress=progress or ctx.progress)
        timings["prepare"] = round(time.perf_counter() - t0, 3)
        tset = prepared.training_set

        result: TrainResult | None = None
        base: dict[str, Any] = {}
        if policy is not None:
            result, base = train_identity(ctx, tset, prepared.face_backend, policy, work, resume, emit)
            timings.update({f"train_{k}": v for k, v in result.timings.items()})
        timings["total"] = round(time.perf_counter() - started, 3)

    staging = settings.identities_dir / f".{name}.staging"
    try:
        write_bundle(staging, name, ctx, prepared, result, policy, base, timings)
        _add_bom(staging, ctx, used)
        sync_tree(staging)
        publish_dir(staging, target)
    finally:
        discard_dir(staging)
    discard_checkpoints(work, keep=bool(policy and policy.keep_checkpoints))
    if not (policy and policy.keep_checkpoints):
        shutil.rmtree(work, ignore_errors=True)
    return load_identity(settings, name)


def ensure_writable(folder: Path) -> None:
    """A file where a folder should be is the user's input (exit 2); a refusal by the machine
    (read-only, permission, full) is OutputFailed (exit 4)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except (NotADirectoryError, FileExistsError) as exc:
        raise BadInput(f"{folder}: portrait home is not writable ({exc.strerror or exc})") from None
    except OSError as exc:
        if exc.errno in ENVIRONMENT_ERRNOS:
            raise OutputFailed(f"{folder}: portrait home is not writable ({(exc.strerror or str(exc)).lower()})") from None
        raise


# --- training -------------------------------------------------------------------------

TRAIN_OPTIONS = ("resolution", "batch_size", "lr", "text_encoder_lr", "alpha", "train_text_encoder", "optimizer",
                 "gradient_checkpointing", "mixed_precision")


def policy_overrides(*, steps: int | None = None, rank: int | None = None, **options: Any) -> dict[str, Any]:
    """`portrait train` options as TrainPolicy fields (None = the preset's value).

    `lr` is the UNet LoRA learning rate. With `optimizer="prodigy"` and no `lr`, both learning
    rates default to 1.0: Prodigy estimates the step size itself and `lr` only scales it.
    """
    unknown = sorted(set(options) - set(TRAIN_OPTIONS))
    if unknown:
        raise BadInput(f"unknown training option(s): {', '.join(unknown)}")
    fields = {"steps": steps, "rank": rank, **{k: v for k, v in options.items() if k != "lr"},
              "learning_rate": options.get("lr")}
    if options.get("optimizer") == "prodigy" and options.get("lr") is None:
        fields["learning_rate"] = 1.0
        if fields.get("text_encoder_lr") is None:
            fields["text_encoder_lr"] = 1.0
    return {k: v for k, v in fields.items() if v is not None}


def train_identity(ctx: RunContext, tset: TrainingSet, face_backend: str, policy: TrainPolicy, work: Path,
                   resume: bool, emit: EventSink) -> tuple[TrainResult, dict[str, Any]]:
    """Train the preset's base on the prepared set; returns the result and the base's record
    (with `validation`: how likeness was measured)."""
    from portrait.core.loaders import load_pipeline

    base_id = train_base(ctx)
    # The trainer adds an adapter to the UNet: give it a pipeline of its own, never one shared
    # through the ModelCache with generation.
    # Training needs every module resident: no CPU offload hooks.
    train_ctx = dataclasses.replace(ctx, cache=ModelCache(max_items=4),
                                    placement=dataclasses.replace(ctx.placement, offload=False))
    # On CPU under bf16 the UNet and text encoders load as bf16 straight from disk.
    dtypes = load_dtypes(policy, ctx.placement.device, ctx.placement.dtype_name)
    pipe = load_pipeline(train_ctx, base_id, dtypes=dtypes)
    # The pipeline is the only holder of its modules from here, so the trainer can free the VAE
    # and frozen text encoders once their outputs are cached, and reload them for validation.
    train_ctx.cache.clear()

    def reload(names: Sequence[str]) -> dict[str, Any]:
        fresh = load_pipeline(dataclasses.replace(train_ctx, cache=ModelCache(max_items=4)), base_id, dtypes=dtypes)
        return {name: getattr(fresh, name) for name in names}

    models = TrainModels(ctx.preset.family, pipe, reload=reload)
    train_idx, held = split_holdout(len(tset.images), policy)
    data = training_data(tset, train_idx)
    if policy.prior_preservation:
        prompt = policy.class_prompt.format(**{"class": tset.class_word})
        folder = class_image_folder(ctx, base_id, policy, prompt)
        extra = class_images(models, prompt, policy, folder, ctx.placement.device, emit)
        data = dataclasses.replace(data, class_images=extra, class_prompt=prompt)
    scorer, validation = validation_scorer(ctx, face_backend, tset, held)
    prompts, note = prompt_scorer(ctx)
    if note:
        validation["notes"] = [note]
    result = train_lora(models, data, policy, work, device=ctx.placement.device, dtype_name=ctx.placement.dtype_name,
                        scorer=scorer, prompt_scorer=prompts, resume=resume, base_model=base_id, on_event=emit,
                        restore_pipeline=False)
    return result, {**base_model_record(ctx, base_id), "validation": validation}


def train_base(ctx: RunContext) -> str:
    """The base a LoRA trains on: the preset's `train_base` role where it has one (the
    undistilled FLUX.2 [klein] base 4B for the 4-step klein; Z-Image for Z-Image-Turbo: a LoRA
    trained on the base serves the distilled model), else its `base`."""
    return ctx.preset.models.get("train_base") or ctx.preset.model("base")


def training_data(tset: TrainingSet, indices: Sequence[int] | None = None) -> TrainData:
    indices = range(len(tset.images)) if indices is None else indices
    images = tuple(read_rgb(tset.images[i]) for i in indices)
    return TrainData(images, tuple(tset.captions[i] for i in indices), tset.trigger, tset.class_word)


def split_holdout(n: int, policy: TrainPolicy) -> tuple[list[int], list[int]]:
    """(training, held-out) indices of the prepared photos, best first.

    Likeness is validated on photos the LoRA never saw, so a LoRA that memorised its training
    photos does not look better than one that learned the face. `policy.holdout` photos are
    held out, spread over the ranking below the best one (the best photo always trains), but
    only when at least `holdout_min_train` remain to train on; otherwise none, and validation
    compares with the training photos (the manifest says which).
    """
    count = policy.holdout if n - policy.holdout >= policy.holdout_min_train else 0
    held = sorted({min(n - 1, max(1, round((j + 1) * n / (count + 1)))) for j in range(count)})
    return [i for i in range(n) if i not in held], held


def validation_scorer(ctx: RunContext, face_backend: str, tset: TrainingSet,
                      held: Sequence[int]) -> tuple[FaceScorer | None, dict[str, Any]]:
    """Likeness of a validation render: the similarity of its largest face to the held-out
    photos' mean embedding, in a space independent of the one that chose the photos
    (portrait.flows.finish.independent_space; dlib offline). None when no reference face can be
    embedded in that space."""
    from portrait.core.faces import make_analyzer
    from portrait.flows.finish import independent_space

    space = independent_space(ctx, face_backend)
    analyzer = make_analyzer(ctx, space)
    sources = [tset.kept_photos[i] for i in held] if held else list(tset.kept_photos)
    embeddings = []
    for path in sources:
        faces = [f for f in analyzer.detect(read_rgb(path)) if f.embedding is not None]
        if faces:
            embeddings.append(max(faces, key=lambda f: f.area).embedding)
    info: dict[str, Any] = {"space": space, "against": "held-out photos" if held else "training photos",
                            "held_out": [Path(tset.images[i]).name for i in held]}
    if not embeddings:
        info["against"] = "nothing (no face embedded in that space)"
        return None, info
    if space == "dlib":  # euclidean space: the mean descriptor
        target = np.mean(embeddings, axis=0)
    else:
        mean = np.mean([e / max(np.linalg.norm(e), 1e-8) for e in embeddings], axis=0)
        target = mean / max(np.linalg.norm(mean), 1e-8)

    def score(image: np.ndarray) -> float | None:
        faces = [f for f in analyzer.detect(image) if f.embedding is not None]
        return analyzer.similarity(target, max(faces, key=lambda f: f.area).embedding) if faces else None

    return score, info


def prompt_scorer(ctx: RunContext) -> tuple[Any, str]:
    """CLIP-T of validation renders against their prompts, or (None, why not). CLIP is loaded
    for each validation and let go after it, so it never sits beside the training step."""
    from portrait.core.errors import ModelMissing
    from portrait.core.licenses import allowed
    from portrait.stages import score as score_stage

    clip_id = ctx.preset.models.get("clip")
    if not clip_id:
        return None, "no CLIP in the preset: prompt adherence (CLIP-T) not measured"
    if not allowed(ctx.registry, clip_id, ctx.settings.license):
        return None, f"CLIP-T not measured: '{clip_id}' is refused by the {ctx.settings.license} license policy"
    if not ctx.registry.is_present(clip_id, ctx.settings) and not ctx.preset.tiny:
        return None, f"CLIP-T not measured: '{clip_id}' is not downloaded (portrait models download {clip_id})"

    def measure(images, prompts):
        own = dataclasses.replace(ctx, cache=ModelCache(max_items=1))
        try:
            return score_stage.clip_t(score_stage.load_clip(own, clip_id), images, prompts)
        except (ModelMissing, BadInput):
            return []
        finally:
            own.cache.clear()

    return measure, ""


def face_scorer(ctx: RunContext, face_backend: str, consensus_by_backend: dict[str, np.ndarray]) -> FaceScorer | None:
    """Identity similarity of a generated image's largest face to the consensus; None when no face."""
    consensus = consensus_by_backend.get(face_backend)
    if consensus is None:
        return None
    from portrait.core.faces import make_analyzer

    analyzer = make_analyzer(ctx, face_backend)

    def score(image: np.ndarray) -> float | None:
        faces = [f for f in analyzer.detect(image) if f.embedding is not None]
        return analyzer.similarity(consensus, faces[0].embedding) if faces else None

    return score


def class_image_folder(ctx: RunContext, base_id: str, policy: TrainPolicy, prompt: str) -> Path:
    import hashlib

    key = hashlib.sha256(f"{base_id}|{ctx.preset.tiny}|{policy.resolution}|{policy.class_steps}|{policy.seed}|{prompt}"
                         .encode()).hexdigest()[:16]
    return ctx.settings.home / "cache" / "class-images" / key


def base_model_record(ctx: RunContext, base_id: str) -> dict[str, Any]:
    from portrait.core.integrity import file_sha256

    resolved = ctx.resolve(base_id)
    weights = main_weights_file(resolved.root, resolved.files)
    digest = None
    if weights is not None:
        # A hash known for this file's size and mtime is not recomputed (a 4 GB base: ~6 s).
        digest = resolved.spec.sha256.get(weights.relative_to(resolved.root).as_posix()) or \
            file_sha256(weights, ctx.settings.home)
    return {"id": base_id, "resolved": resolved.spec.id, "origin": resolved.origin,
            "file": weights.relative_to(resolved.root).as_posix() if weights else None,
            "sha256": digest, "hash": digest[:10] if digest else None}


def main_weights_file(root: Path, files: Sequence[str]) -> Path | None:
    """The file whose hash names a base: a single checkpoint, or the diffusers denoiser's weights
    (the UNet's, or a transformer's first shard)."""
    singles = [root / f for f in files if f.endswith((".safetensors", ".ckpt")) and "/" not in f]
    if len(singles) == 1 and singles[0].is_file():
        return singles[0]
    for part in ("unet", "transformer"):
        found = sorted((root / part).glob("diffusion_pytorch_model*.safetensors")) if (root / part).is_dir() else []
        if found:
            return found[0]
    return None


# --- the bundle -----------------------------------------------------------------------


def write_bundle(staging: Path, name: str, ctx: RunContext, prepared, result: TrainResult | None,
                 policy: TrainPolicy | None, base: dict[str, Any], timings: dict[str, float]) -> None:
    """The identity bundle of this run, written by portrait.core.bundle.write_bundle."""
    tset = prepared.training_set
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    manifest: dict[str, Any] = {
        "name": name,
        "trigger": tset.trigger,
        "class_word": tset.class_word,
        "preset": ctx.preset.name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "face_backend": prepared.face_backend,
        "license_policy": ctx.settings.license,
        "captions": list(tset.captions),
        "versions": package_versions(),
        "device": {"device": ctx.placement.device, "dtype": ctx.placement.dtype_name},
        "timings": timings,
    }
    lora = None
    if result is not None and policy is not None:
        family = ctx.preset.family
        flow = "transformer" in result.lora
        lora = BundleLora(family, result.lora, result.rank, result.alpha, base_model=base.get("id", ""),
                          unet_targets=policy.unet_targets, text_targets=policy.text_targets,
                          transformer_targets=result.targets if flow else (),
                          kohya_metadata={"ss_network_dim": str(result.rank), "ss_network_alpha": str(result.alpha),
                                          "ss_base_model_version": KOHYA_BASE_NAMES.get(family, family),
                                          "ss_output_name": name, "portrait_trigger": tset.trigger},
                          row={"base_hash": base.get("hash"), "text_encoder": policy.train_text_encoder,
                               "layout": "transformer" if flow else "unet"})
        manifest["base_model"] = {k: v for k, v in base.items() if k != "validation"}
        manifest["train"] = {**result_summary(result), "seed": policy.seed,
                             "validation_seeds": list(policy.validation_seeds),
                             "validation": base.get("validation"),
                             "losses": [round(x, 6) for x in result.losses]}
        manifest["validation"] = validation_summary(result)
    write_bundle_files(staging, manifest, reference=tset.reference, photos=tset.kept_photos,
                                embeddings=tset.consensus, report=prepared.report, lora=lora)
    if result is not None and any(row.get("scores") for row in manifest.get("validation", [])):
        from portrait.core.formats.curve import curve_image
        from portrait.core.io import write_image

        write_image(staging / "curve.png", curve_image(manifest["validation"]))
        update_manifest(staging, curve="curve.png")
    from portrait.flows.finish import photo_spreads

    # the copy-paste guard's yardstick: how alike this person's own photos are, per space
    photos = [staging / p for p in read_manifest(staging)["photos"]]
    update_manifest(staging, self_similarity=photo_spreads(ctx, sorted(set(tset.consensus) | {"dlib"}), photos))


def _add_bom(staging: Path, ctx: RunContext, used: dict) -> None:
    """The bill of materials of the training run, into the staged manifest."""
    from portrait.flows.generate import bill_of_materials

    update_manifest(staging, bom=bill_of_materials(ctx, used))


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    import portrait

    found = {"portrait": portrait.__version__}
    for name in VERSIONED_PACKAGES:
        try:
            found[name] = version(name if name != "dlib" else "dlib-bin")
        except PackageNotFoundError:
            try:
                found[name] = version(name)
            except PackageNotFoundError:
                continue
    return found


__all__ = ["train", "ensure_writable", "write_bundle", "face_scorer"]
