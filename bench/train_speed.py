"""Training speed and memory: our LoRA trainer vs diffusers' DreamBooth-LoRA script, side by side.

What a user feels is the time to a finished identity and the peak memory, so each variant
runs as a whole process (Python start, imports, model load, training, the LoRA written) and
the parent times it from outside. Both train the same LoRA (rank, targets, AdamW, learning
rate, batch 1, text encoder frozen) on the same model and photos for the same step count.
The script's SD1.5 dataset does not flip images, so ours runs with `flip: false` here too
(with flips on, each mirror a run draws costs one more VAE encode, once).

- baseline: a faithful re-implementation of the loop of diffusers'
  `examples/dreambooth/train_dreambooth_lora.py` (defaults: fp32 on CPU, no gradient
  checkpointing, text encoder frozen, no pre-computed embeddings). Per step the dataset opens
  the image file, applies Resize + CenterCrop + ToTensor + Normalize and tokenizes the prompt;
  then VAE encode + sample, text encode, UNet forward and backward, clip, AdamW step. The VAE
  and text encoder stay loaded all run. At the end it writes the LoRA with
  `save_lora_weights`, as the script does.
- ours: `portrait.stages.train.train_lora`, the trainer `portrait train` runs (latents and
  prompt embeddings encoded on first use, the VAE and text encoder freed once everything the
  run will draw is cached, a checkpoint with optimizer and RNG state at the end), with
  validation renders off as in the baseline.

Figures, each the median over `--repeats` interleaved pairs (baseline, then ours, then the
next pair), with `--threads` torch threads per process:
- steps/s after warm-up: the steps after the first, timed inside the process (CPU time, the
  figure least disturbed by other load on a shared machine; wall time is printed beside it);
- whole process: wall time of the child process, per step count in `--steps`;
- peak memory: the process's max RSS on CPU (max allocated on CUDA).

`--arch sd15` builds the real SD1.5 architecture (presets/configs/sd15, random weights: the
values do not change the work) once in the home folder, and trains at 256 px by default.

    python bench/train_speed.py                          # tiny model, 64 px, 8 and 100 steps
    python bench/train_speed.py --arch sd15 --steps 8    # SD1.5 architecture, 256 px
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
PROMPT = "a photo of sks person"


def sample_images(folder: Path, resolution: int) -> list[Path]:
    """Three real photos, at twice the training size so the baseline's resize does real work."""
    import numpy as np
    from PIL import Image
    from skimage import data

    from portrait.samples import hopper_photo

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate((data.astronaut()[0:300, 100:400], hopper_photo()[100:400, 100:400], data.chelsea()[0:300, 0:300])):
        path = folder / f"{resolution}-{i}.png"
        if not path.exists():
            Image.fromarray(np.ascontiguousarray(image)).resize((resolution * 2, resolution * 2), Image.LANCZOS).save(path)
        paths.append(path)
    return paths


def loader(settings, preset: str, model_dir: str | None, ours: bool = False, dtypes=None, ctx=None):
    """(ctx, load()) where load() returns a fresh pipeline. Ours: the shipped loader, as
    `portrait train` calls it (the folder as `--base`, the parts in `dtypes`); the baseline:
    diffusers' from_pretrained on the folder, as the script loads it."""
    import dataclasses

    from portrait.core.cache import ModelCache
    from portrait.core.context import RunContext
    from portrait.core.loaders import load_pipeline

    ctx = ctx or RunContext.create(settings, preset=preset)
    if model_dir and not ours:
        from diffusers import StableDiffusionPipeline

        return ctx, lambda: StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None,
                                                                    requires_safety_checker=False)
    where = {"base_path": model_dir, "family": "sd15", "vae": None} if model_dir else {}
    return ctx, lambda: load_pipeline(dataclasses.replace(ctx, cache=ModelCache()), dtypes=dtypes, **where)


def write_sd15_architecture(root: Path) -> Path:
    """A diffusers SD1.5 folder: the real configs, random weights, the real CLIP tokenizer."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from portrait.core.tiny.diffusion import write_pipeline_folder

    configs = Path(__file__).resolve().parents[1] / "presets" / "configs" / "sd15"
    target = root / "sd15-architecture"
    if (target / "model_index.json").exists():
        return target
    torch.manual_seed(0)
    parts = {
        "unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(configs / "unet")),
        "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(configs / "vae")),
        "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(configs / "text_encoder")),
        "scheduler": PNDMScheduler.from_pretrained(configs / "scheduler"),
    }
    write_pipeline_folder(target, parts, "sd15")
    return target


def policy_for(ctx, steps: int, resolution: int, rank: int | None, precision: str | None = None):
    """The preset's train section with the bench's fixed knobs; `precision` None keeps the preset's."""
    from portrait.stages.train import TrainPolicy

    extra = {"mixed_precision": precision} if precision else {}
    return TrainPolicy.from_section(ctx.preset.section("train"), steps=steps, resolution=resolution, rank=rank,
                                    train_text_encoder=False, gradient_checkpointing=False, snr_gamma=0.0, flip=False,
                                    validation_seeds=[], checkpoint_every=10**9, optimizer="adamw", **extra)


class StepClock:
    """Wall and CPU time at the end of the first step and of the last."""

    def __init__(self):
        self.marks: list[tuple[float, float]] = []

    def mark(self) -> None:
        self.marks.append((time.perf_counter(), time.process_time()))

    def figures(self) -> dict:
        (w0, c0), (w1, c1) = self.marks[0], self.marks[-1]
        return {"timed_steps": len(self.marks) - 1, "loop_s": w1 - w0, "loop_cpu_s": c1 - c0}


def run_ours(settings, preset, images, steps, resolution, rank, model_dir, out: Path, precision: str) -> dict:
    from portrait.core.context import RunContext
    from portrait.core.formats.images import read_rgb
    from portrait.stages.train import TrainData, TrainModels, load_dtypes, save_diffusers_lora, train_lora

    ctx = RunContext.create(settings, preset=preset)
    policy = policy_for(ctx, steps, resolution, rank, precision)
    # As the train flow: the parts that train in bf16 on this CPU are loaded as bf16.
    ctx, load = loader(settings, preset, model_dir, ours=True, ctx=ctx,
                       dtypes=load_dtypes(policy, ctx.placement.device, ctx.placement.dtype_name))
    pipe = load()

    def reload(names):
        fresh = load()
        return {name: getattr(fresh, name) for name in names}

    # The trainer's input: RGB arrays (portrait train reads its prepared crops the same way).
    arrays = tuple(read_rgb(p) for p in images)
    data = TrainData(arrays, (PROMPT,) * len(arrays), "sks", "person")
    clock = StepClock()
    result = train_lora(TrainModels(ctx.preset.family, pipe, reload=reload), data, policy, out / "work",
                        device=ctx.placement.device, dtype_name=ctx.placement.dtype_name, restore_pipeline=False,
                        on_event=lambda e: clock.mark() if e.phase == "step" else None)
    save_diffusers_lora(out / "lora.safetensors", ctx.preset.family, result.lora, result.rank, result.alpha)
    return {**clock.figures(), "trained_in": "bf16" if load_dtypes(policy, ctx.placement.device, "float32") else "fp32"}


def run_baseline(settings, preset, images, steps, resolution, rank, model_dir, out: Path, precision: str) -> dict:
    """diffusers' train_dreambooth_lora.py loop, on the same model (no caching). `precision`:
    the script's --mixed_precision (its default, no, is fp32); under bf16 it casts the loaded
    UNet, VAE and text encoder to bf16, keeps the LoRA in fp32, and runs the UNet under autocast
    (accelerate wraps the prepared UNet's forward so)."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from PIL import Image
    from PIL.ImageOps import exif_transpose
    from torchvision import transforms

    ctx, load = loader(settings, preset, model_dir)
    if ctx.preset.family != "sd15":
        raise SystemExit("the baseline mirrors the SD1.5 script; use an sd15-family preset")
    pipe = load()
    policy = policy_for(ctx, steps, resolution, rank, "no")
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    device = ctx.placement.device
    weight_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
        module.to(device, dtype=weight_dtype)
    torch.manual_seed(policy.seed)
    unet.add_adapter(LoraConfig(r=policy.rank, lora_alpha=policy.alpha, init_lora_weights="gaussian",
                                target_modules=list(policy.unet_targets)))
    cast_training_params(unet, dtype=torch.float32)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=policy.learning_rate, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    lr_scheduler = get_scheduler(policy.lr_scheduler, optimizer=optimizer, num_warmup_steps=0, num_training_steps=steps)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    image_transforms = transforms.Compose([
        transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.CenterCrop(resolution),
        transforms.ToTensor(),
        transforms.Normalize([0.5], [0.5]),
    ])
    clock = StepClock()
    unet.train()
    for step in range(steps):
        # DreamBoothDataset.__getitem__: open, exif-transpose, convert, transform, tokenize
        image = exif_transpose(Image.open(images[step % len(images)]))
        if image.mode != "RGB":
            image = image.convert("RGB")
        pixel_values = image_transforms(image).unsqueeze(0).to(device, dtype=weight_dtype)
        input_ids = tokenizer(PROMPT, truncation=True, padding="max_length", max_length=tokenizer.model_max_length,
                              return_tensors="pt").input_ids.to(device)
        # the training step
        model_input = vae.encode(pixel_values).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(model_input)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (model_input.shape[0],), device=device)
        noisy = noise_scheduler.add_noise(model_input, noise, timesteps)
        encoder_hidden_states = text_encoder(input_ids)[0]
        with torch.autocast("cpu" if device == "cpu" else "cuda", dtype=weight_dtype, enabled=precision == "bf16"):
            model_pred = unet(noisy, timesteps, encoder_hidden_states, return_dict=False)[0]
        loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, policy.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
        float(loss.detach().item())  # the script logs the loss every step
        clock.mark()
    StableDiffusionPipeline.save_lora_weights(str(out), unet_lora_layers=get_peft_model_state_dict(unet))
    return {**clock.figures(), "trained_in": "bf16" if precision == "bf16" else "fp32"}


def process_age_s() -> float:
    """Seconds since this process started (Linux /proc): its whole-process time, seen from inside."""
    start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    from portrait.core.config import Settings

    settings = Settings(home=Path(args.home), preset=args.preset, device=args.device)
    images = sample_images(Path(args.home) / "bench-images", args.resolution)
    fn = run_ours if args.variant == "ours" else run_baseline
    precision = args.ours_precision if args.variant == "ours" else args.baseline_precision
    precision = None if precision == "preset" else precision
    with tempfile.TemporaryDirectory() as out:
        result = fn(settings, args.preset, images, args.steps[0], args.resolution, args.rank, args.model_dir, Path(out),
                    precision)
    result.update(variant=args.variant, steps=args.steps[0], peak_mb=peak_memory_mb(settings.device), precision=precision,
                  arch="sd15" if args.model_dir else "tiny", resolution=args.resolution, rank=args.rank,
                  threads=args.threads, finished=time.time(), load=load_average(), process_s=process_age_s())
    print(json.dumps(result))
    # Every run is also appended to HOME/train-bench.jsonl, so a long run cut short still leaves
    # its finished pairs (`--from-results` prints the table from such a file).
    with open(Path(args.home) / "train-bench.jsonl", "a") as log:
        log.write(json.dumps(result) + "\n")


def ensure_tiny(home: Path, preset: str) -> None:
    from portrait.core.config import Settings, load_preset
    from portrait.core.registry import Registry
    from portrait.core.registry import make_tiny

    if not load_preset(preset).tiny:
        return
    registry = Registry.load()
    roles = load_preset(preset).models
    wanted = {registry.stand_in(roles[r], True).id for r in ("base", "vae") if r in roles}
    make_tiny(Settings(home=home, preset=preset), registry, only=wanted)


def run_child(args, variant: str, steps: int, home: Path, model_args: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--variant", variant, "--steps", str(steps), "--resolution", str(args.resolution),
           "--preset", args.preset, "--device", args.device, "--home", str(home), "--threads", str(args.threads),
           "--rank", str(args.rank), "--ours-precision", args.ours_precision,
           "--baseline-precision", args.baseline_precision, *model_args]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if out.returncode:
        raise SystemExit(f"{variant} child failed:\n{out.stderr[-3000:]}")
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row["process_s"] = wall
    return row


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=("tiny", "sd15"), default="tiny",
                        help="tiny: the preset's stand-in models; sd15: the real SD1.5 architecture, random weights")
    parser.add_argument("--steps", type=lambda s: [int(x) for x in s.split(",")], default=None,
                        help="comma-separated step counts, each a whole run (default 8,100 tiny; 8 sd15)")
    parser.add_argument("--resolution", type=int, default=None, help="training size (default 64 tiny, 256 sd15)")
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank, both variants")
    parser.add_argument("--preset", default=None, help="preset for the training policy (default tiny / sd15)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--home", default=None, help="HOME holding the models (default: a temp home with make-tiny)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved (baseline, ours) pairs per step count")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads per process (1 keeps a shared machine's load from skewing the ratio)")
    parser.add_argument("--ours-precision", choices=("preset", "auto", "no", "bf16"), default="preset",
                        help="portrait train --mixed-precision (preset: the preset's, auto unless it sets one; "
                             "auto: bf16 on CPUs with bf16 instructions, else fp32; the tiny preset sets no)")
    parser.add_argument("--baseline-precision", choices=("no", "bf16"), default="no",
                        help="the script's --mixed_precision (its default: no, fp32)")
    parser.add_argument("--from-results", default=None,
                        help="print the table from a train-bench.jsonl (pairs in order) instead of running")
    parser.add_argument("--variant", choices=("ours", "baseline"), help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    real = args.arch == "sd15"
    args.steps = args.steps or ([8] if real else [8, 100])
    args.resolution = args.resolution or (256 if real else 64)
    args.preset = args.preset or ("sd15" if real else "tiny")
    if args.variant:
        return child(args)
    if args.from_results:
        return report_file(args, Path(args.from_results))
    if min(args.steps) < 2:
        raise SystemExit("--steps: each run needs at least 2 steps (the first is the warm-up)")

    loads = [load_average()]
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(args.home) if args.home else Path(tmp)
        model_args = []
        if real:
            model_args = ["--model-dir", str(write_sd15_architecture(home))]
        else:
            ensure_tiny(home, args.preset)
        runs: dict[int, list[tuple[dict, dict]]] = {}
        for steps in args.steps:
            runs[steps] = []
            for _ in range(args.repeats):
                base = run_child(args, "baseline", steps, home, model_args)
                ours = run_child(args, "ours", steps, home, model_args)
                runs[steps].append((base, ours))
                loads.append(load_average())
                print(f"  {steps} steps: baseline {base['process_s']:.1f} s, {base['peak_mb']:.0f} MB; "
                      f"ours {ours['process_s']:.1f} s, {ours['peak_mb']:.0f} MB", file=sys.stderr, flush=True)
    report(args, runs, loads)


def report_file(args, path: Path) -> None:
    """The table from logged runs of this --arch: each baseline paired with the next ours run."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("arch") == args.arch and "process_s" in r]
    runs: dict[int, list[tuple[dict, dict]]] = {}
    pending: dict[int, dict] = {}
    for row in rows:
        if row["variant"] == "baseline":
            pending[row["steps"]] = row
        elif row["steps"] in pending:
            runs.setdefault(row["steps"], []).append((pending.pop(row["steps"]), row))
    args.repeats = min(len(v) for v in runs.values())
    report(args, runs, sorted({r["load"] for r in rows}))


def report(args, runs: dict[int, list[tuple[dict, dict]]], loads: list[str]) -> None:
    med = statistics.median
    pairs = [pair for rows in runs.values() for pair in rows]

    def speed(row, key="loop_cpu_s"):
        return row["timed_steps"] / row[key]

    def trained(side: int) -> str:
        return "/".join(sorted({pair[side].get("trained_in", "fp32") for pair in pairs}))

    title = (f"{args.arch} architecture, {args.resolution} px, batch 1, rank {args.rank}; "
             f"script {trained(0)}, portrait {trained(1)}")
    print(f"{title}; {args.threads} torch thread(s) per process; median of {args.repeats} interleaved pairs "
          f"per step count ({len(pairs)} pairs for the per-step figures); load average seen: {', '.join(loads)}")
    print()
    print(f"| {title} | diffusers' script (re-implemented) | portrait | ratio |")
    print("| --- | --- | --- | --- |")
    b, o = med(speed(b) for b, _ in pairs), med(speed(o) for _, o in pairs)
    r = med(speed(o) / speed(b) for b, o in pairs)
    print(f"| steps per CPU-second after warm-up | {b:.3f} | {o:.3f} | {r:.2f}x faster |")
    b, o = med(speed(b, "loop_s") for b, _ in pairs), med(speed(o, "loop_s") for _, o in pairs)
    r = med(speed(o, "loop_s") / speed(b, "loop_s") for b, o in pairs)
    print(f"| steps/s (wall) after warm-up | {b:.3f} | {o:.3f} | {r:.2f}x faster |")
    for steps, rows in runs.items():
        b, o = med(b["process_s"] for b, _ in rows), med(o["process_s"] for _, o in rows)
        r = med(b["process_s"] / o["process_s"] for b, o in rows)
        print(f"| whole process, {steps} steps | {b:.1f} s | {o:.1f} s | {r:.2f}x faster |")
    b, o = med(b["peak_mb"] for b, _ in pairs), med(o["peak_mb"] for _, o in pairs)
    r = med(o["peak_mb"] / b["peak_mb"] for b, o in pairs)
    what = "peak allocated" if args.device.startswith("cuda") else "peak RSS"
    print(f"| {what} | {b:.0f} MB | {o:.0f} MB | {r:.2f}x |")
    print()
    print("targets: steps/s ratio >= 2.0, whole-process ratio > 1.0 at every step count, peak memory ratio <= 0.8")


if __name__ == "__main__":
    main()
