"""Training speed and memory: our LoRA trainer against the real peers, each a whole process.

What a user feels is the time to a finished LoRA and the peak memory, so every variant runs as
a whole process (Python start, imports, model load, caching, training, the LoRA written) and
the parent times it from outside. The peers are the ACTUAL reference scripts, given by path
and run unmodified (this bench ships none of their code):

- diffusers: `--diffusers-script PATH` (examples/dreambooth/train_dreambooth_lora.py for the
  SD1.5 architecture; train_dreambooth_lora_flux.py / _flux2_klein.py / _z_image.py for the
  flow-matching tiny models), run with this interpreter;
- kohya sd-scripts: `--kohya-script PATH` (train_network.py, SD1.5 only), run with
  `--kohya-python` (sd-scripts pins its own diffusers/transformers: give it its own venv).

Every process (ours included) is started through this file's `--clock` launcher, which
registers a global optimizer step hook (`torch.optim.optimizer.register_optimizer_step_post_hook`)
and then runs the script as `__main__`: the step times of all sides come from the same clock,
and nothing inside a peer is changed. From the marks: steps/s after warm-up (steps 2..N; wall
and CPU time of the process), seconds to the first step, and seconds from the last step to the
process's exit. Peak memory is the child's max RSS from wait4 (on CUDA a process's own
`torch.cuda.max_memory_allocated` is not visible from outside: CPU only).

Matched settings on every side: batch 1, rank 4 (alpha 4: the diffusers SD script's
lora_alpha = rank), lr 1e-4, AdamW, constant schedule, no flips, text encoder frozen, no
gradient checkpointing, the frozen weights in --precision (fp32 or bf16), one torch thread per
process (--threads), the same attention LoRA modules (SD1.5: to_q/to_k/to_v/to_out.0 of all
32 attention layers = 128 modules; kohya is limited to them by a network-module shim written
here, since its networks.lora also adapts proj_in/proj_out/ff; flow families: each script's own
default target list, which is ours too). Each side keeps its own default for the LoRA weights'
precision under bf16 (ours fp32; diffusers' scripts bf16; kohya fp32 unless --full_bf16).

    # SD1.5 architecture, random weights, 256 px (the peers fetched as mirrors):
    python bench/train_speed.py --arch sd15 --precision bf16 --steps 8,100 --repeats 1 \\
        --diffusers-script /tmp/peers/diffusers-examples/examples/dreambooth/train_dreambooth_lora.py \\
        --kohya-script /tmp/peers/sd-scripts/train_network.py --kohya-python /tmp/peers/kohya-venv/bin/python
    # a flow-matching tiny stand-in against its diffusers script:
    python bench/train_speed.py --arch tiny-flux2-klein --steps 8,100 \\
        --diffusers-script .../train_dreambooth_lora_flux2_klein.py

Variants run interleaved (one of each, then the next round), the load average is printed.
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
ROOT = Path(__file__).resolve().parents[1]
# arch -> (preset, family, diffusers script name)
ARCHES = {
    "sd15": ("sd15", "sd15", "train_dreambooth_lora.py"),
    "tiny": ("tiny", "sd15", "train_dreambooth_lora.py"),
    "tiny-flux": ("tiny-flux", "flux", "train_dreambooth_lora_flux.py"),
    "tiny-flux2-klein": ("tiny-flux2-klein", "flux2-klein", "train_dreambooth_lora_flux2_klein.py"),
    "tiny-zimage": ("tiny-zimage", "zimage", "train_dreambooth_lora_z_image.py"),
}
RANK = ALPHA = 4
LR = 1e-4


# --- the clock: every process runs through it ------------------------------------------------


def clock(out: str, script: str, argv: list[str]) -> None:
    """Run `script` as __main__ with `argv`, marking (epoch, CPU seconds) at every optimizer step."""
    import atexit
    import runpy

    marks: list[tuple[float, float]] = []
    start = time.time() - process_age_s()

    def save() -> None:
        Path(out).write_text(json.dumps({"start": start, "marks": marks, "exit": time.time()}))

    atexit.register(save)
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    register_optimizer_step_post_hook(
        lambda *_: marks.append((time.time(), time.process_time())))
    sys.argv = [script, *argv]
    sys.path.insert(0, str(Path(script).resolve().parent))
    runpy.run_path(script, run_name="__main__")


def process_age_s() -> float:
    """Seconds since this process started (Linux /proc)."""
    start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


# --- ours, as a script the clock runs ---------------------------------------------------------


def ours(args) -> None:
    """Our trainer as `portrait train` runs it after prepare: the base loaded (the parts that
    train in bf16 loaded as bf16), train_lora (latents and prompts cached before step 1, the VAE
    and text encoders freed, a checkpoint at the end), the LoRA written in diffusers' layout."""
    import dataclasses

    from portrait.core.cache import ModelCache
    from portrait.core.config import Settings
    from portrait.core.context import RunContext
    from portrait.core.formats.images import read_rgb
    from portrait.core.loaders import load_pipeline
    from portrait.flows.train import train_base
    from portrait.stages.train import TrainData, TrainModels, TrainPolicy, load_dtypes, save_diffusers_lora, train_lora

    preset, family, _script = ARCHES[args.arch]
    settings = Settings(home=Path(args.home), preset=preset, device="cpu")
    ctx = RunContext.create(settings, preset=preset)
    overrides = {"unet_targets": ("to_q", "to_k", "to_v", "to_out.0")} if family == "sd15" else {}
    policy = TrainPolicy.from_section(
        ctx.preset.section("train"), steps=args.steps[0], resolution=args.resolution, rank=RANK, alpha=ALPHA,
        learning_rate=LR, train_text_encoder=False, gradient_checkpointing=False, snr_gamma=None, flip=False,
        validation_seeds=[], checkpoint_every=10**9, optimizer="adamw", batch_size=1, lr_scheduler="constant",
        mixed_precision="bf16" if args.precision == "bf16" else "no", max_sequence_length=args.sequence, **overrides)
    dtypes = load_dtypes(policy, "cpu", "float32")
    where = {"base_path": args.model_dir, "family": family, "vae": None} if args.model_dir else {}

    def load():
        return load_pipeline(dataclasses.replace(ctx, cache=ModelCache()), None if args.model_dir else train_base(ctx),
                             dtypes=dtypes, **where)

    def reload(names):
        fresh = load()
        return {name: getattr(fresh, name) for name in names}

    images = tuple(read_rgb(p) for p in sorted(Path(args.data).glob("*.png")))
    data = TrainData(images, (PROMPT,) * len(images), "sks", "person")
    with tempfile.TemporaryDirectory() as out:
        result = train_lora(TrainModels(family, load(), reload=reload), data, policy, Path(out) / "work",
                            restore_pipeline=False)
        save_diffusers_lora(Path(args.out) / "lora.safetensors", family, result.lora, result.rank, result.alpha,
                            transformer_targets=result.targets or None)
    from portrait.cli.main import leave

    leave(0)  # as `portrait train` ends (the CLI's entry): no interpreter teardown once the work is written


# --- the peers' command lines -------------------------------------------------------------------


def diffusers_args(args, family: str, model: Path, data: Path, out: Path, steps: int) -> list[str]:
    line = ["--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(data), "--instance_prompt",
            PROMPT, "--output_dir", str(out), "--resolution", str(args.resolution), "--train_batch_size", "1",
            "--max_train_steps", str(steps), "--learning_rate", str(LR), "--rank", str(RANK), "--seed", "0",
            "--mixed_precision", "bf16" if args.precision == "bf16" else "no", "--lr_scheduler", "constant",
            "--lr_warmup_steps", "0", "--checkpointing_steps", str(10**9)]
    if family != "sd15":
        line += ["--lora_alpha", str(ALPHA), "--max_sequence_length", str(args.sequence)]
    if family == "flux2-klein":
        line += ["--text_encoder_out_layers", "9", "18", "27"]  # the pipeline's layers (the tiny Qwen3 has 28)
    return line


KOHYA_SHIM = '''"""The bench's kohya network module: networks.lora limited to the attention projections
(attn1/attn2 to_q, to_k, to_v, to_out.0), the modules diffusers' SD script and ours adapt."""
import re

from networks import lora as _lora

_KEEP = re.compile(r"_attn[12]_to_(q|k|v|out_0)$")


def create_network(*args, **kwargs):
    # The LoRA modules are registered on the network only by apply_to(), from these lists.
    network = _lora.create_network(*args, **kwargs)
    network.unet_loras = [m for m in network.unet_loras if _KEEP.search(m.lora_name)]
    network.text_encoder_loras = []
    print(f"bench shim: {len(network.unet_loras)} attention LoRA modules")
    return network


create_network_from_weights = _lora.create_network_from_weights
'''


def kohya_args(args, model: Path, data: Path, out: Path, steps: int) -> list[str]:
    return ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data), "--output_dir", str(out),
            "--output_name", "lora", "--resolution", str(args.resolution), "--train_batch_size", "1",
            "--max_train_steps", str(steps), "--learning_rate", str(LR), "--optimizer_type", "AdamW",
            "--network_module", "bench_kohya_attention", "--network_dim", str(RANK), "--network_alpha", str(ALPHA),
            "--network_train_unet_only", "--mixed_precision", "bf16" if args.precision == "bf16" else "no",
            "--save_precision", "float", "--save_model_as", "safetensors", "--cache_latents", "--sdpa",
            "--seed", "0", "--max_data_loader_n_workers", "0", "--caption_extension", ".txt",
            "--lr_scheduler", "constant", "--tokenizer_cache_dir", str(Path(data).parent / "kohya-tokenizers")]


# --- running one variant ------------------------------------------------------------------------


def run_variant(args, variant: str, steps: int, env_paths: dict) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"bench-{variant}-"))
    marks_file = work / "marks.json"
    python, script = sys.executable, str(Path(__file__).resolve())
    preset, family, _ = ARCHES[args.arch]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "BENCH_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if variant == "portrait":
        argv = ["--variant", "ours", "--arch", args.arch, "--steps", str(steps), "--resolution", str(args.resolution),
                "--home", str(env_paths["home"]), "--data", str(env_paths["data"]), "--out", str(work),
                "--precision", args.precision, "--sequence", str(args.sequence)]
        if args.arch == "sd15":
            argv += ["--model-dir", str(env_paths["model"])]
        target = script
    elif variant == "diffusers":
        target, argv = args.diffusers_script, diffusers_args(args, family, env_paths["model"], env_paths["data"],
                                                             work / "out", steps)
    else:
        python, target = args.kohya_python, args.kohya_script
        argv = kohya_args(args, env_paths["model"], env_paths["kohya_data"], work / "out", steps)
        env["PYTHONPATH"] = os.pathsep.join([str(env_paths["shim"]), str(Path(target).resolve().parent)])
    cmd = [python, script, "--clock", str(marks_file), "--", target, *argv]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    output = proc.stdout.read()
    _pid, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    ended = time.time()
    if status != 0 or not marks_file.is_file():
        raise SystemExit(f"{variant} failed ({status}):\n{output[-4000:]}")
    clock_data = json.loads(marks_file.read_text())
    marks = clock_data["marks"]
    if len(marks) != steps:
        raise SystemExit(f"{variant}: {len(marks)} optimizer steps seen, {steps} asked:\n{output[-2000:]}")
    (w0, c0), (w1, c1) = marks[0], marks[-1]
    row = {"variant": variant, "steps": steps, "process_s": wall, "peak_mb": usage.ru_maxrss / 1024,
           "first_step_s": w0 - clock_data["start"], "after_last_s": ended - w1,
           "teardown_s": ended - clock_data["exit"],  # the interpreter's exit after the script returned
           "steps_per_s": (steps - 1) / (w1 - w0) if steps > 1 else None,
           "steps_per_cpu_s": (steps - 1) / (c1 - c0) if steps > 1 else None, "load": load_average(),
           "arch": args.arch, "precision": args.precision, "resolution": args.resolution, "threads": args.threads}
    with open(Path(env_paths["home"]) / "train-bench.jsonl", "a") as log:
        log.write(json.dumps(row) + "\n")
    return row


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


# --- inputs: the model and the photos -----------------------------------------------------------


def write_sd15_architecture(root: Path) -> Path:
    """A diffusers SD1.5 folder: the real configs (portrait/presets/configs/sd15), random weights,
    the real CLIP tokenizer."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from portrait.core.tiny.diffusion import write_pipeline_folder

    configs = ROOT / "portrait" / "presets" / "configs" / "sd15"
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


def sample_images(folder: Path, kohya: Path, resolution: int) -> None:
    """Three photos at twice the training size (every side resizes them), and kohya's copy in
    its `<repeats>_<prompt>` folder layout with caption files."""
    import numpy as np
    from PIL import Image
    from skimage import data

    from portrait.samples import hopper_photo

    concept = kohya / "1_sks person"
    for where in (folder, concept):
        where.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate((data.astronaut()[0:300, 100:400], hopper_photo()[100:400, 100:400],
                               data.chelsea()[0:300, 0:300])):
        pil = Image.fromarray(np.ascontiguousarray(image)).resize((resolution * 2, resolution * 2), Image.LANCZOS)
        pil.save(folder / f"{i}.png")
        pil.save(concept / f"{i}.png")
        (concept / f"{i}.txt").write_text(PROMPT)


def prepare_inputs(args, home: Path) -> dict:
    from portrait.core.config import Settings
    from portrait.core.context import RunContext
    from portrait.core.registry import Registry
    from portrait.core.registry import make_tiny
    from portrait.flows.train import train_base

    preset, family, _ = ARCHES[args.arch]
    paths = {"home": home, "data": home / "bench-images", "kohya_data": home / "bench-images-kohya",
             "shim": home / "bench-shim"}
    sample_images(paths["data"], paths["kohya_data"], args.resolution)
    paths["shim"].mkdir(exist_ok=True)
    (paths["shim"] / "bench_kohya_attention.py").write_text(KOHYA_SHIM)
    if args.arch == "sd15":
        paths["model"] = write_sd15_architecture(home)
        # kohya loads its CLIP tokenizer by hub id unless a cache folder holds it: the model's own
        # (the real CLIP vocabulary, built offline) is put where it looks.
        import shutil

        cached = home / "kohya-tokenizers" / "openai_clip-vit-large-patch14"
        if not cached.exists():
            shutil.copytree(paths["model"] / "tokenizer", cached)
    else:
        settings = Settings(home=home, preset=preset, device="cpu")
        ctx = RunContext.create(settings, preset=preset)
        registry = Registry.load()
        make_tiny(settings, registry, only={registry.stand_in(train_base(ctx), True).id})
        paths["model"] = ctx.resolve(train_base(ctx)).root
    return paths


# --- the table ----------------------------------------------------------------------------------


def report(args, rows: list[dict], loads: list[str]) -> None:
    med = statistics.median
    variants = [v for v in ("portrait", "kohya", "diffusers") if any(r["variant"] == v for r in rows)]

    def pick(variant, key, steps=None):
        values = [r[key] for r in rows if r["variant"] == variant and (steps is None or r["steps"] == steps)
                  and r[key] is not None]
        return med(values) if values else None

    names = {"portrait": "portrait", "kohya": "kohya sd-scripts train_network.py",
             "diffusers": f"diffusers {ARCHES[args.arch][2]}"}
    print(f"{args.arch} architecture, {args.resolution} px, batch 1, rank {RANK}, {args.precision} on every side, "
          f"{args.threads} torch thread(s) per process, median of {args.repeats} interleaved round(s); "
          f"load average seen: {', '.join(loads)}")
    print()
    print("| | " + " | ".join(names[v] for v in variants) + " |")
    print("| --- |" + " --- |" * len(variants))

    def line(label, key, fmt, steps=None):
        cells = []
        for v in variants:
            value = pick(v, key, steps)
            cells.append("-" if value is None else fmt.format(value))
        print(f"| {label} | " + " | ".join(cells) + " |")

    line("steps/s after warm-up (wall)", "steps_per_s", "{:.3f}")
    line("steps per CPU-second after warm-up", "steps_per_cpu_s", "{:.3f}")
    for steps in args.steps:
        line(f"whole process, {steps} steps", "process_s", "{:.1f} s", steps)
    line("peak RSS", "peak_mb", "{:.0f} MB")
    line("seconds to the first step", "first_step_s", "{:.1f}")
    line("seconds after the last step", "after_last_s", "{:.1f}")
    line("... of which interpreter exit", "teardown_s", "{:.1f}")
    print()
    peers = [v for v in variants if v != "portrait"]
    if not peers or "portrait" not in variants:
        return
    # Steps per CPU-second is the per-step figure least disturbed by other load on a shared
    # machine (a process's wall steps/s moves with the load average); both are printed.
    fastest = max(peers, key=lambda v: pick(v, "steps_per_cpu_s") or 0)
    lowest = min(peers, key=lambda v: pick(v, "peak_mb") or 1e12)
    ratio = (pick("portrait", "steps_per_cpu_s") or 0) / (pick(fastest, "steps_per_cpu_s") or 1)
    wall = (pick("portrait", "steps_per_s") or 0) / (pick(fastest, "steps_per_s") or 1)
    print(f"steps per CPU-second: portrait / faster peer ({fastest}) = {ratio:.2f}x (wall: {wall:.2f}x) "
          f"(target >= 1.5x): {'met' if ratio >= 1.5 else 'NOT met'}")
    for steps in args.steps:
        worst = min(pick(v, "process_s", steps) for v in peers) / pick("portrait", "process_s", steps)
        print(f"whole process at {steps} steps: fastest peer / portrait = {worst:.2f}x (target > 1.0): "
              f"{'met' if worst > 1.0 else 'NOT met'}")
    mem = pick("portrait", "peak_mb") / pick(lowest, "peak_mb")
    print(f"peak RSS: portrait / lower peer ({lowest}) = {mem:.2f}x (target <= 0.6): {'met' if mem <= 0.6 else 'NOT met'}")


def main() -> None:
    if "--clock" in sys.argv:
        i = sys.argv.index("--clock")
        j = sys.argv.index("--", i)
        return clock(sys.argv[i + 1], sys.argv[j + 1], sys.argv[j + 2:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=tuple(ARCHES), default="tiny-flux2-klein")
    parser.add_argument("--steps", type=lambda s: [int(x) for x in s.split(",")], default=[8, 100])
    parser.add_argument("--resolution", type=int, default=None, help="default 256 for sd15, 64 for the tiny models")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--sequence", type=int, default=128, help="text tokens (flow-matching families)")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved rounds of every variant")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--home", default=None, help="a home to keep the models and the runs' log in")
    parser.add_argument("--diffusers-script", default=None, help="diffusers' examples/dreambooth script for the arch")
    parser.add_argument("--kohya-script", default=None, help="kohya sd-scripts' train_network.py (SD1.5 only)")
    parser.add_argument("--kohya-python", default=sys.executable, help="the interpreter with sd-scripts' requirements")
    parser.add_argument("--from-results", default=None,
                        help="print the table from a HOME/train-bench.jsonl of earlier runs instead of running")
    parser.add_argument("--variant", choices=("ours",), help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.resolution = args.resolution or (256 if args.arch == "sd15" else 64)
    if args.variant:
        return ours(args)
    if args.from_results:
        rows = [json.loads(line) for line in Path(args.from_results).read_text().splitlines() if line.strip()]
        rows = [r for r in rows if r["arch"] == args.arch and r["precision"] == args.precision]
        args.steps = sorted({r["steps"] for r in rows})
        args.repeats = min(sum(1 for r in rows if r["variant"] == "portrait" and r["steps"] == n) for n in args.steps)
        return report(args, rows, sorted({r["load"] for r in rows}))
    if min(args.steps) < 2:
        raise SystemExit("--steps: each run needs at least 2 steps (the first is the warm-up)")
    variants = ["portrait"]
    if args.kohya_script:
        if ARCHES[args.arch][1] != "sd15":
            raise SystemExit("--kohya-script: the kohya comparison is for the SD1.5 architecture (--arch sd15)")
        variants.append("kohya")
    if args.diffusers_script:
        variants.append("diffusers")
    loads = [load_average()]
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(args.home) if args.home else Path(tmp)
        home.mkdir(parents=True, exist_ok=True)
        paths = prepare_inputs(args, home)
        rows = []
        for steps in args.steps:
            for _ in range(args.repeats):
                for variant in variants:
                    row = run_variant(args, variant, steps, paths)
                    rows.append(row)
                    print(f"  {variant} {steps} steps: {row['process_s']:.1f} s, {row['peak_mb']:.0f} MB, "
                          f"{row['steps_per_s'] or 0:.3f} steps/s, {row['after_last_s']:.1f} s after the last step",
                          file=sys.stderr, flush=True)
                loads.append(load_average())
    report(args, rows, loads)


if __name__ == "__main__":
    main()
