"""Training speed: our cached LoRA trainer vs diffusers' DreamBooth-LoRA recipe.

Both variants train the same LoRA (same rank, targets, optimizer, learning rate) on the same
tiny model, images, batch size and step count. The baseline does per step what
`examples/dreambooth/train_dreambooth_lora.py` does (text encoder frozen, its default):
the dataset opens the image file, applies Resize + CenterCrop + ToTensor + Normalize and
tokenizes the prompt; then VAE encode + sample, text encode, UNet forward and backward,
clip, AdamW step. Ours encodes latents (and the mirror) and prompt embeddings once, so a
step is the UNet alone.

Each variant runs in its own process so peak memory (max RSS on CPU, max allocated on CUDA)
is its own; the growth over the peak right after loading the model is what training adds.
The first `--warmup` steps of each are run but not timed (lazy allocations, kernel choice).
Prints steps/s for each, the ratio, and peak memory.

`--arch sd15` runs both on the real SD1.5 architecture instead of the tiny stand-in: the
shipped configs (presets/configs/sd15) with random weights, written once to a temp folder.
The weights' values do not change the work, so this measures what a real run costs, at a
resolution the CPU can afford (default 256 px; pass --resolution 512 for the real size).

    python bench/train_speed.py [--steps 60] [--resolution 64] [--preset tiny] [--home DIR] [--device cpu]
    python bench/train_speed.py --arch sd15 [--steps 4] [--resolution 256]
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


def sample_images(folder: Path, resolution: int) -> list[Path]:
    """Three real photos, at twice the training size so the baseline's resize does real work."""
    import numpy as np
    from PIL import Image
    from skimage import data

    from portrait.samples import hopper_photo

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate((data.astronaut()[0:300, 100:400], hopper_photo()[100:400, 100:400], data.chelsea()[0:300, 0:300])):
        path = folder / f"{i}.png"
        Image.fromarray(np.ascontiguousarray(image)).resize((resolution * 2, resolution * 2), Image.LANCZOS).save(path)
        paths.append(path)
    return paths


def load(settings, preset: str, model_dir: str | None):
    from portrait.core.context import RunContext
    from portrait.core.loaders import load_pipeline

    ctx = RunContext.create(settings, preset=preset)
    if model_dir:
        from diffusers import StableDiffusionPipeline

        return ctx, StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
    return ctx, load_pipeline(ctx)


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


def policy_for(ctx, steps: int, resolution: int):
    from portrait.stages.train import TrainPolicy

    return TrainPolicy.from_section(ctx.preset.section("train"), steps=steps, resolution=resolution,
                                    train_text_encoder=False, gradient_checkpointing=False, snr_gamma=0.0,
                                    validation_seeds=[], checkpoint_every=10**9)


def run_ours(settings, preset: str, images: list[Path], steps: int, resolution: int, warmup: int,
             model_dir: str | None) -> dict:
    import numpy as np
    from PIL import Image

    from portrait.stages.train import TrainData, TrainModels, optimize, setup_training, step_loss

    ctx, pipe = load(settings, preset, model_dir)
    policy = policy_for(ctx, warmup + steps, resolution)
    arrays = tuple(np.asarray(Image.open(p).convert("RGB")) for p in images)
    data = TrainData(arrays, ("a photo of sks person",) * len(arrays), "sks", "person")
    loaded_mb = peak_memory_mb(ctx.placement.device)
    t0 = time.perf_counter()
    run = setup_training(TrainModels(ctx.preset.family, pipe), data, policy, warmup + steps,
                         device=ctx.placement.device, dtype_name=ctx.placement.dtype_name)
    pipe.unet.train()
    for step in range(warmup):
        optimize(run, step_loss(run, step))
    setup = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), time.process_time()
    for step in range(warmup, warmup + steps):
        optimize(run, step_loss(run, step))
    return {"setup_s": setup, "loop_s": time.perf_counter() - t0, "loop_cpu_s": time.process_time() - c0,
            "loaded_mb": loaded_mb}


def run_baseline(settings, preset: str, images: list[Path], steps: int, resolution: int, warmup: int,
                 model_dir: str | None) -> dict:
    """diffusers' train_dreambooth_lora.py inner loop, on our tiny model (no caching)."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig
    from PIL import Image
    from PIL.ImageOps import exif_transpose
    from torchvision import transforms

    ctx, pipe = load(settings, preset, model_dir)
    if ctx.preset.family != "sd15":
        raise SystemExit("the baseline mirrors the SD1.5 script; use an sd15-family preset")
    policy = policy_for(ctx, warmup + steps, resolution)
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    device = ctx.placement.device
    loaded_mb = peak_memory_mb(device)
    t0 = time.perf_counter()
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
    torch.manual_seed(policy.seed)
    unet.add_adapter(LoraConfig(r=policy.rank, lora_alpha=policy.alpha, init_lora_weights="gaussian",
                                target_modules=list(policy.unet_targets)))
    cast_training_params(unet, dtype=torch.float32)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=policy.learning_rate, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    lr_scheduler = get_scheduler(policy.lr_scheduler, optimizer=optimizer, num_warmup_steps=0,
                                 num_training_steps=warmup + steps)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    image_transforms = transforms.Compose([
        transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.CenterCrop(resolution),
        transforms.ToTensor(),
        transforms.Normalize([0.5], [0.5]),
    ])
    prompt = "a photo of sks person"
    unet.train()
    for step in range(warmup + steps):
        if step == warmup:  # setup includes the warmup steps, as for ours
            setup = time.perf_counter() - t0
            t0, c0 = time.perf_counter(), time.process_time()
        # DreamBoothDataset.__getitem__: open, exif-transpose, convert, transform, tokenize
        image = exif_transpose(Image.open(images[step % len(images)]))
        if image.mode != "RGB":
            image = image.convert("RGB")
        pixel_values = image_transforms(image).unsqueeze(0).to(device)
        input_ids = tokenizer(prompt, truncation=True, padding="max_length", max_length=tokenizer.model_max_length,
                              return_tensors="pt").input_ids.to(device)
        # the training step
        model_input = vae.encode(pixel_values).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(model_input)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (model_input.shape[0],), device=device)
        noisy = noise_scheduler.add_noise(model_input, noise, timesteps)
        encoder_hidden_states = text_encoder(input_ids)[0]
        model_pred = unet(noisy, timesteps, encoder_hidden_states, return_dict=False)[0]
        loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, policy.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad()
    return {"setup_s": setup, "loop_s": time.perf_counter() - t0, "loop_cpu_s": time.process_time() - c0,
            "loaded_mb": loaded_mb}


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def child(args) -> None:
    from portrait.core.config import Settings

    settings = Settings(home=Path(args.home), preset=args.preset, device=args.device)
    images = sample_images(Path(args.home) / "bench-images", args.resolution)
    fn = run_ours if args.variant == "ours" else run_baseline
    result = fn(settings, args.preset, images, args.steps, args.resolution, args.warmup, args.model_dir)
    result.update(variant=args.variant, steps=args.steps, peak_mb=peak_memory_mb(settings.device))
    print(json.dumps(result))


def ensure_tiny(home: Path, preset: str) -> None:
    from portrait.core.config import Settings, load_preset
    from portrait.core.registry import Registry
    from portrait.core.tiny import make_tiny

    if not load_preset(preset).tiny:
        return
    registry = Registry.load()
    roles = load_preset(preset).models
    wanted = {registry.stand_in(roles[r], True).id for r in ("base", "vae") if r in roles}
    make_tiny(Settings(home=home, preset=preset), registry, only=wanted)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=("tiny", "sd15"), default="tiny",
                        help="tiny: the preset's stand-in models; sd15: the real SD1.5 architecture, random weights")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 60 tiny, 4 sd15)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first, in both variants")
    parser.add_argument("--resolution", type=int, default=None, help="training size (default 64 tiny, 256 sd15)")
    parser.add_argument("--preset", default=None, help="preset for the training policy (default tiny / sd15)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--home", default=None, help="HOME holding the models (default: a temp home with make-tiny)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="alternate the variants this many times; best of each (default 5 tiny, 1 sd15)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads per variant (1 keeps a shared machine's load from skewing the ratio)")
    parser.add_argument("--variant", choices=("ours", "baseline"), help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    real = args.arch == "sd15"
    args.steps = args.steps or (4 if real else 60)
    args.resolution = args.resolution or (256 if real else 64)
    args.preset = args.preset or ("sd15" if real else "tiny")
    args.repeats = args.repeats or (1 if real else 5)
    if args.variant:
        return child(args)

    with tempfile.TemporaryDirectory() as tmp:
        home = Path(args.home) if args.home else Path(tmp)
        model_args = []
        if real:
            model_args = ["--model-dir", str(write_sd15_architecture(home))]
        else:
            ensure_tiny(home, args.preset)
        results: dict[str, list[dict]] = {"baseline": [], "ours": []}
        for _ in range(args.repeats):
            for variant in ("baseline", "ours"):
                cmd = [sys.executable, __file__, "--variant", variant, "--steps", str(args.steps), "--resolution",
                       str(args.resolution), "--preset", args.preset, "--device", args.device, "--home", str(home),
                       "--warmup", str(args.warmup), *model_args]
                env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
                out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
                results[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
    # Two summaries of the repeats. Best of each: other processes only ever make a run slower.
    # Median of the paired ratios: each baseline run is paired with the ours run right after it,
    # so a slow spell on a shared machine hits both sides of a pair. CPU time is the figure
    # least disturbed by other load; wall time is printed beside it.
    best = {v: min(rows, key=lambda r: r["loop_cpu_s"]) for v, rows in results.items()}
    for variant, rows in results.items():
        print(f"{variant:9s} each run: " + ", ".join(f"{args.steps / r['loop_cpu_s']:.2f}" for r in rows) + " steps/CPU-s")
    for variant in ("baseline", "ours"):
        row = best[variant]
        print(f"{variant:9s} {args.steps / row['loop_cpu_s']:7.2f} steps/CPU-s, {args.steps / row['loop_s']:7.2f} steps/s wall"
              f"  (loop {row['loop_s']:.2f} s, "
              f"setup {row['setup_s']:.2f} s, peak {row['peak_mb']:.0f} MB, "
              f"+{row['peak_mb'] - row['loaded_mb']:.0f} MB over the loaded model)")
    paired = sorted(b["loop_cpu_s"] / o["loop_cpu_s"] for b, o in zip(results["baseline"], results["ours"]))
    median = statistics.median(paired)
    ratio = best["baseline"]["loop_cpu_s"] / best["ours"]["loop_cpu_s"]
    wall = best["baseline"]["loop_s"] / best["ours"]["loop_s"]
    total = (best["baseline"]["loop_s"] + best["baseline"]["setup_s"]) / (best["ours"]["loop_s"] + best["ours"]["setup_s"])
    print(f"{args.arch} architecture, {args.resolution} px, batch 1, {args.steps} timed steps after {args.warmup} "
          f"warmup, {args.threads} thread(s)")
    print(f"paired ratios: {', '.join(f'{r:.2f}' for r in paired)}")
    print(f"speed-up: {median:.2f}x steps per CPU-second, median of paired runs (best of each: {ratio:.2f}x; "
          f"{wall:.2f}x wall, {total:.2f}x wall including setup and caching); target >= 1.5x")


if __name__ == "__main__":
    main()
