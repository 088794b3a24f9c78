"""A GPU check anyone can run: does portrait really work on this CUDA card?

    python scripts/gpu_check.py                 # on a CUDA machine, < 8 minutes
    python scripts/gpu_check.py --dry-run       # the same code paths on the CPU, tiny sizes (CI)

What it runs, each step timed and recorded in one JSON (`--out`, default gpu_check.json):

1. training: a LoRA on the tiny preset in fp16 (GradScaler: loss scaling, unscale, skipped
   overflow steps) and in bf16 (the dry run: bf16, and fp16's GradScaler logic on the CPU), and
   the flow-matching loop (klein, Z-Image, FLUX.1 tiny stand-ins) in bf16 (the dry run: two
   bf16 steps of the klein loop);
2. every backend on its tiny preset in its family's precision: resident, with offload forced
   (model and group offload) and with int8 where the family declares it, each image checked
   (not NaN, not black);
3. face analysis on onnxruntime's CUDA provider (the session's own providers are read);
4. real-size random-weight SD1.5 and SDXL UNets (and the FLUX transformer where memory allows),
   built on the machine from the shipped configs and written in the real format (diffusers
   folders, safetensors): steps per second and peak VRAM through portrait's loaders against
   the memory plan's prediction and against bare diffusers on the same weights. The dry run
   builds the tiny sizes instead.

It exits 1 when any step fails or draws a black/NaN image, 2 when CUDA is absent without
--dry-run. Nothing here is a test of speed: the numbers are printed for a person to read.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GIB = 2**30


@dataclasses.dataclass
class Step:
    name: str
    ok: bool = False
    seconds: float = 0.0
    details: dict[str, Any] = dataclasses.field(default_factory=dict)
    error: str = ""


class Check:
    def __init__(self, device: str, dry_run: bool):
        self.device, self.dry_run = device, dry_run
        self.steps: list[Step] = []

    def run(self, name: str, fn: Callable[[], dict[str, Any]]) -> Step:
        step = Step(name)
        started = time.perf_counter()
        self._reset_peak()
        try:
            step.details = fn() or {}
            step.ok = True
        except Exception as exc:  # a failed step is recorded and the check goes on
            step.error = f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:400]
            step.details["traceback"] = traceback.format_exc(limit=4)[-1500:]
        step.seconds = round(time.perf_counter() - started, 2)
        print(f"{'ok  ' if step.ok else 'FAIL'} {name} ({step.seconds:.1f} s){'' if step.ok else ': ' + step.error}",
              file=sys.stderr)
        self.steps.append(step)
        return step

    def _reset_peak(self) -> None:
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_gb(self) -> float | None:
        import torch

        return round(torch.cuda.max_memory_allocated() / GIB, 3) if self.device.startswith("cuda") else None


def check_image(image) -> dict[str, Any]:
    """A rendered image must be finite and not black (the fp16-overflow failure)."""
    import numpy as np

    array = np.asarray(image, dtype=np.float32)
    if not np.isfinite(array).all():
        raise AssertionError("NaN/inf pixels")
    if array.max() <= 2.0 or array.std() < 0.5:
        raise AssertionError(f"black or flat image (max {array.max():.1f}, std {array.std():.2f})")
    return {"mean": round(float(array.mean()), 2), "std": round(float(array.std()), 2)}


# --- 1. training ------------------------------------------------------------------------------------


def training(check: Check, home: Path, photos: list[Path]) -> None:
    from portrait.core.config import Settings
    from portrait.flows.train import train

    settings = Settings(home=home, device=check.device, preset="tiny")
    check.run("train fp16 GradScaler logic", gradscaler_logic)
    check.run("train bf16 autocast step", autocast_step)
    # The flow-matching loop (stages/train_flow.py) in bf16, the precision FLUX and klein train in.
    check.run("train flow-matching step bf16 (tiny klein base)", lambda: flow_matching_step(check, home))
    if check.dry_run:  # the whole trainer takes ~35 s on 2 CPU cores: the GPU run trains for real
        return
    for preset in ("tiny-flux2-klein", "tiny-zimage", "tiny-flux"):
        def run_flow(preset=preset):
            flow_settings = Settings(home=home, device=check.device, preset=preset)
            identity = train(photos, name=f"gpu-{preset}", settings=flow_settings, preset=preset, steps=4,
                             mixed_precision="bf16", overwrite=True)
            record = identity.manifest["train"]
            assert all(np.isfinite(record["losses"])), record["losses"]
            return {"identity": identity.name, "precision": "bf16", "steps": record["steps"],
                    "final_loss": record["final_loss"], "peak_vram_gb": check.peak_gb()}
        check.run(f"train lora {preset} bf16", run_flow)
    for mode in ("fp16", "bf16"):
        def run(mode=mode):
            identity = train(photos, name=f"gpu-{mode}", settings=settings, preset="tiny", steps=4,
                             mixed_precision=mode, overwrite=True)
            report = json.loads((home / "identities" / identity.name / "report.json").read_text())
            losses = [x for x in json.dumps(report).split() if x]  # the report exists and is JSON
            return {"identity": identity.name, "precision": mode, "peak_vram_gb": check.peak_gb(),
                    "report_bytes": len(losses)}
        check.run(f"train lora tiny {mode}", run)


def flow_matching_step(check: Check, home: Path) -> dict[str, Any]:
    """Two steps of the flow-matching trainer on the tiny FLUX.2 [klein] base in bf16 (on CUDA
    the card's; in the dry run the CPU's autocast): latents and prompts cached, the transformer
    in bf16 with fp32 LoRA weights, the loss finite and every LoRA tensor moved by AdamW."""
    import dataclasses as dc

    import torch

    from portrait.core.cache import ModelCache
    from portrait.core.config import Settings
    from portrait.core.context import RunContext
    from portrait.core.loaders import load_pipeline
    from portrait.flows.train import train_base
    from portrait.stages.train import TrainData, TrainModels, TrainPolicy, optimize
    from portrait.stages.train_flow import flow_step_loss, lora_parameters, setup_flow_training

    preset = "tiny-flux2-klein"
    ctx = RunContext.create(Settings(home=home, device=check.device, preset=preset), preset=preset)
    pipe = load_pipeline(dc.replace(ctx, cache=ModelCache()), train_base(ctx))
    policy = TrainPolicy.from_section(ctx.preset.section("train"), steps=2, mixed_precision="bf16", flip=False,
                                      validation_seeds=[], learning_rate=1e-2)
    rng = np.random.default_rng(0)
    images = tuple(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(2))
    run = setup_flow_training(TrainModels("flux2-klein", pipe), TrainData(images, ("a photo of sks person",) * 2, "sks",
                                                                          "person"),
                              policy, total=2, device=check.device, dtype_name="bfloat16")
    run.prefill(0)
    before = {n: p.detach().clone() for n, p in lora_parameters(pipe.transformer).items()}
    pipe.transformer.train()
    losses = []
    for step in range(2):
        loss = flow_step_loss(run, step)
        optimize(run, loss)
        losses.append(float(loss.detach()))
    after = lora_parameters(pipe.transformer)
    moved = sum(not torch.equal(before[n], p.detach()) for n, p in after.items())
    assert all(np.isfinite(losses)) and moved == len(after), (losses, moved, len(after))
    assert pipe.transformer.dtype == torch.bfloat16 and all(p.dtype == torch.float32 for p in after.values())
    return {"losses": [round(x, 5) for x in losses], "lora_tensors": len(after), "moved": moved,
            "peak_vram_gb": check.peak_gb()}


def gradscaler_logic() -> dict[str, Any]:
    """The trainer's fp16 branch (stages/train.optimize): the loss is scaled, gradients unscaled
    before clipping, an overflowing step skipped and the scale backed off. On the CPU torch's
    GradScaler runs the same logic (`torch.amp.GradScaler("cpu")`)."""
    from types import SimpleNamespace

    import torch

    from portrait.stages.train import Precision, optimize

    precision = Precision("cpu", "fp16") if not torch.cuda.is_available() else Precision("cuda", "fp16")
    device = precision.device
    weight = torch.nn.Parameter(torch.ones(4, device=device))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    run = SimpleNamespace(precision=precision, trained_params=[weight], optimizer=optimizer,
                          policy=SimpleNamespace(max_grad_norm=1.0),
                          lr_scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0))
    scale0 = precision.scaler.get_scale()
    optimize(run, (weight * 2).sum())
    moved = float((weight.detach() - 1).abs().max())
    optimize(run, (weight * float("inf")).sum())  # overflow: skipped, scale backed off
    after = weight.detach().clone()
    assert moved > 0 and precision.scaler.get_scale() < scale0
    optimize(run, (weight * 0).sum() + weight.sum())
    assert torch.isfinite(after).all()
    return {"scale_start": scale0, "scale_after_overflow": precision.scaler.get_scale(), "first_step_moved": moved}


def autocast_step() -> dict[str, Any]:
    """One forward/backward of the trainer's Precision in bf16 (fp32 LoRA-style weights)."""
    import torch

    from portrait.stages.train import Precision

    precision = Precision("cuda" if torch.cuda.is_available() else "cpu", "bf16")
    layer = torch.nn.Linear(8, 8).to(precision.device)
    with precision.autocast():
        out = layer(torch.randn(2, 8, device=precision.device))
    out.float().pow(2).mean().backward()
    assert out.dtype == torch.bfloat16 and torch.isfinite(layer.weight.grad).all()
    return {"dtype": str(out.dtype)}


# --- 2. backends --------------------------------------------------------------------------------------


BACKEND_PRESETS = {"sd15": "tiny", "sdxl": "tiny-sdxl", "flux": "tiny-flux"}


def backends(check: Check, home: Path) -> None:
    from portrait.core.config import Settings
    from portrait.core.context import RunContext
    from portrait.core.memplan import family_runtime
    from portrait.flows.generate import generate
    from portrait.stages.backends import BACKENDS

    for spec in BACKENDS.specs():
        family = spec.families[0]
        preset = BACKEND_PRESETS.get(family)
        if preset is None or spec.photo_template:
            continue
        identity = "gpu-bf16" if spec.needs_lora else "gpu-zero"
        modes = ["resident", "model", "group"] + (["int8"] if family_runtime(family).quantize else [])
        if check.dry_run:  # CI's 2 cores: the text-only FLUX backend takes every mode (~15 s)
            if spec.name != "flux":
                continue
        for mode in modes:
            def run(spec=spec, preset=preset, mode=mode, identity=identity):
                settings = Settings(home=home, device=check.device, preset=preset)
                ctx = RunContext.create(settings, preset=preset)
                sections = {k: dict(v) for k, v in ctx.preset.sections.items()}
                if mode == "int8":
                    sections["runtime"] = {**sections.get("runtime", {}), "quantize": "int8"}
                if mode in ("model", "group"):  # offload forced (generate.memory.offload)
                    generate_section = sections.setdefault("generate", {})
                    generate_section["memory"] = {**generate_section.get("memory", {}), "offload": mode}
                ctx = dataclasses.replace(ctx, preset=dataclasses.replace(ctx.preset, sections=sections))
                out = home / "out" / f"{spec.name}-{mode}"
                prompt = "portrait photo of a man img" if spec.name == "photomaker" else "a studio portrait of {trigger}"
                result = generate(identity, prompt=prompt, backend=spec.name, n=1, seed=3, out=out, ctx=ctx,
                                  finish=False, steps=1 if check.dry_run else 2)
                from PIL import Image

                stats = check_image(Image.open(result.paths[0]).convert("RGB"))
                plan = result.info.get("memory_plan") or {}
                return {"backend": spec.name, "preset": preset, "mode": mode, "strategy": plan.get("strategy"),
                        "dtype": plan.get("dtype"), "quantize": plan.get("quantize"),
                        "predicted_peak_gb": plan.get("predicted_peak_gb"), "peak_vram_gb": check.peak_gb(), **stats}
            check.run(f"backend {spec.name} {mode}", run)


# --- 3. face analysis -----------------------------------------------------------------------------------


def face_analysis(check: Check, home: Path, photo: Path) -> dict[str, Any]:
    import numpy as np
    from PIL import Image

    from portrait.core.config import Settings
    from portrait.core.faces import InsightfaceAnalyzer
    from portrait.core.registry import Registry

    settings = Settings(home=home, device=check.device, preset="tiny")
    resolved = Registry.load().resolve("antelopev2", settings, tiny=True)
    analyzer = InsightfaceAnalyzer(resolved.root, "antelopev2", device=check.device, det_size=128)
    faces = analyzer.detect(np.asarray(Image.open(photo).convert("RGB")))
    providers = sorted({p for m in analyzer._app.models.values() for p in m.session.get_providers()})
    if check.device.startswith("cuda") and "CUDAExecutionProvider" not in providers:
        raise AssertionError(f"face analysis ran on {providers}, not CUDA (see `portrait doctor`)")
    return {"providers": providers, "faces": len(faces)}


# --- 4. real-size random weights --------------------------------------------------------------------------


def real_size(check: Check, work: Path) -> None:
    families = ["sd15"] if check.dry_run else ["sd15", "sdxl"] + (["flux"] if _free_gb(check) >= 30 else [])
    for family in families:
        check.run(f"real-size {family} random weights", lambda family=family: one_real_size(check, work, family))


def _free_gb(check: Check) -> float:
    import torch

    if not check.device.startswith("cuda"):
        return 0.0
    return torch.cuda.mem_get_info()[0] / GIB


def build_random(family: str, folder: Path, dtype, tiny: bool) -> dict[str, Any]:
    """A denoiser of the real architecture (or the tiny one) with random weights, written as a
    diffusers folder in safetensors: the format the registry's real models come in."""
    import torch
    import diffusers

    from portrait.core.config import presets_root

    if tiny:
        from portrait.core.tiny import diffusion, flux as tiny_flux

        if family == "flux":
            model = tiny_flux.flux_parts(0)["transformer"] if hasattr(tiny_flux, "flux_parts") else None
            if model is None:
                raise RuntimeError("no tiny FLUX builder")
        else:
            model = (diffusion.sdxl_parts(0) if family == "sdxl" else diffusion.sd15_parts(0))["unet"]
    else:
        part = "transformer" if family == "flux" else "unet"
        config = json.loads((Path(str(presets_root())) / "configs" / family / part / "config.json").read_text())
        cls = diffusers.FluxTransformer2DModel if family == "flux" else diffusers.UNet2DConditionModel
        with torch.device("cpu"):
            model = cls.from_config(config)
    model = model.to(dtype)
    model.save_pretrained(folder, safe_serialization=True)
    return {"params": sum(p.numel() for p in model.parameters())}


def one_real_size(check: Check, work: Path, family: str) -> dict[str, Any]:
    import torch
    import diffusers

    from portrait.core import memplan as mp

    tiny = check.dry_run or not check.device.startswith("cuda")
    dtype = torch.float32 if not check.device.startswith("cuda") else (torch.bfloat16 if family == "flux" else torch.float16)
    folder = work / f"{family}-random"
    built = build_random(family, folder, dtype, tiny)
    count = mp.folder_count(folder)  # the plan's header count of what was written
    predicted = count.params * (4 if dtype == torch.float32 else 2)
    cls = diffusers.FluxTransformer2DModel if family == "flux" else diffusers.UNet2DConditionModel
    size = 64 if tiny else {"sd15": 512, "sdxl": 1024, "flux": 1024}[family]
    steps = 2 if tiny else 10
    results = {}
    for how in ("portrait", "diffusers"):
        check._reset_peak()
        if how == "portrait":  # the loaders' own part reader (tensor by tensor into the meta-built model)
            from portrait.core.archs.diffusers import diffusers_part

            model = diffusers_part(cls, folder, dtype, None).to(check.device).eval()
        else:
            model = cls.from_pretrained(folder, torch_dtype=dtype).to(check.device).eval()
        measured = sum(p.numel() * p.element_size() for p in model.parameters())
        inputs = _denoiser_inputs(model, family, size, dtype, check.device)
        with torch.inference_mode():
            out = model(**inputs).sample
            if check.device.startswith("cuda"):
                torch.cuda.synchronize()
            started = time.perf_counter()
            for _ in range(steps):
                out = model(**inputs).sample
            if check.device.startswith("cuda"):
                torch.cuda.synchronize()
        elapsed = time.perf_counter() - started
        if not torch.isfinite(out).all():
            raise AssertionError(f"{family}: NaN in the denoiser output ({how})")
        results[how] = {"steps_per_s": round(steps / elapsed, 3), "peak_vram_gb": check.peak_gb(),
                        "param_gb": round(measured / GIB, 3)}
        del model
    error = abs(predicted - measured) / measured
    if error > 0.10:
        raise AssertionError(f"{family}: the plan's weights {predicted / GIB:.2f} GB are {error:.0%} off the "
                             f"measured {measured / GIB:.2f} GB")
    return {"family": family, "size": size, "tiny": tiny, **built, "predicted_weights_gb": round(predicted / GIB, 3),
            "plan_error": round(error, 4), **{f"{k}_{m}": v for k, r in results.items() for m, v in r.items()}}


def _denoiser_inputs(model, family: str, size: int, dtype, device: str) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(0)
    config = model.config
    if family == "flux":
        tokens = (size // 16) ** 2
        return {"hidden_states": torch.randn(1, tokens, config.in_channels, generator=g).to(device, dtype),
                "encoder_hidden_states": torch.randn(1, 64, config.joint_attention_dim, generator=g).to(device, dtype),
                "pooled_projections": torch.randn(1, config.pooled_projection_dim, generator=g).to(device, dtype),
                "timestep": torch.tensor([0.5], device=device, dtype=dtype),
                "guidance": torch.tensor([3.5], device=device, dtype=dtype) if config.guidance_embeds else None,
                "img_ids": torch.zeros(tokens, 3, device=device, dtype=dtype),
                "txt_ids": torch.zeros(64, 3, device=device, dtype=dtype)}
    latent = size // 8
    batch = 2  # CFG's doubled batch
    args = {"sample": torch.randn(batch, config.in_channels, latent, latent, generator=g).to(device, dtype),
            "timestep": torch.tensor(500, device=device),
            "encoder_hidden_states": torch.randn(batch, 77, config.cross_attention_dim, generator=g).to(device, dtype)}
    if family == "sdxl":
        args["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim,
                                       generator=g).to(device, dtype),
            "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * batch, device=device, dtype=dtype)}
    return args


# --- main ---------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="Run the same code paths on the CPU at tiny sizes.")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="Where the JSON goes.")
    parser.add_argument("--home", type=Path, default=None, help="A portrait home to use (default: a temporary one).")
    args = parser.parse_args(argv)

    import torch

    if args.dry_run:
        device = "cpu"
        torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    elif torch.cuda.is_available():
        device = "cuda"
    else:
        print("error: no CUDA device is visible to torch; run with --dry-run for the CPU paths", file=sys.stderr)
        return 2
    check = Check(device, args.dry_run)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="portrait-gpu-check-") as tmp:
        home = args.home or Path(tmp) / "home"
        from portrait.core.config import Settings
        from portrait.flows.train import train
        from portrait.samples import write_sample_photos

        photos = write_sample_photos(Path(tmp) / "photos", bad_file=False)
        # three shots of one person make an identity (the face analysis per photo is the step's cost)
        check.run("prepare zero-shot identity", lambda: {"identity": train(
            photos[:3], name="gpu-zero", settings=Settings(home=home, device=device, preset="tiny"), preset="tiny",
            zero_shot=True, overwrite=True).name})
        training(check, home, photos)
        backends(check, home)
        check.run("face analysis (onnxruntime)", lambda: face_analysis(check, home, photos[0]))
        real_size(check, Path(tmp))
    env = {"device": device, "dry_run": args.dry_run, "torch": torch.__version__,
           "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None}
    failed = [s.name for s in check.steps if not s.ok]
    document = {"environment": env, "seconds": round(time.perf_counter() - started, 1), "failed": failed,
                "steps": [dataclasses.asdict(s) for s in check.steps]}
    args.out.write_text(json.dumps(document, indent=2, default=str))
    print(f"{len(check.steps) - len(failed)} passed, {len(failed)} failed; wrote {args.out}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
