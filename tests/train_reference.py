"""One training step of ours and of diffusers' reference script on a tiny flow-matching stand-in.

Both sides build the very same step: the preset's tiny train base, one 64 px photo, one prompt,
rank 4 / alpha 2, no flips, batch 1, fp32, and every LoRA weight overwritten with
portrait.core.tiny.lora.fill_lora (non-zero B, so every gradient shows). Ours is
`our_run` + `our_step`; the reference (`reference_step`, run only when recording fixtures, see
tests/reference_fixtures.py) is diffusers' own examples/dreambooth script for the family, read
from a fetched mirror at v0.40.0 and run in this process by its `main(parse_args(...))`.

How the reference gets the same step:
- the same weights: it loads the same tiny train-base folder; after its
  `transformer.add_adapter(...)` (patched to call through) every LoRA weight is overwritten by
  `fill_lora`, as ours is after setup;
- the same batch: one 64 x 64 PNG in --instance_data_dir holding our photo's pixels, the same
  prompt, no flips, batch 1, fp32;
- the same noise: our step's draws come from its (seed, step) generator
  (`portrait.stages.train_flow.step_inputs`); the script's draws are replaced by those tensors:
  `torch.randn_like` returns our noise for the model input's shape, the script's module-level
  `compute_density_for_timestep_sampling` returns our u, and for FLUX.1 (whose script samples
  the latent) `DiagonalGaussianDistribution.sample` returns mean + std * our eps;
- what is recorded: `Accelerator.backward` records the loss; `Accelerator.clip_grad_norm_`
  (called before clipping) records the LoRA gradients and stops the script.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

# family -> (tiny preset, diffusers' script, extra script arguments)
FAMILIES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "flux": ("tiny-flux", "train_dreambooth_lora_flux.py", ("--guidance_scale", "3.5")),
    # The script's own default text layers (10, 20, 30) differ from the pipeline's (9, 18, 27),
    # which the pipeline renders with; we train on the pipeline's, and so must the reference.
    "flux2-klein": ("tiny-flux2-klein", "train_dreambooth_lora_flux2_klein.py",
                    ("--text_encoder_out_layers", "9", "18", "27")),
    "zimage": ("tiny-zimage", "train_dreambooth_lora_z_image.py", ()),
}
PROMPT = "a photo of sks person"
SEED = 0
RANK, ALPHA, LR, SEQUENCE = 4, 2.0, 1e-3, 128


def reference_image() -> np.ndarray:
    """A 64 x 64 RGB face crop (skimage's astronaut), at the training size so neither side resizes."""
    from PIL import Image
    from skimage import data

    return np.asarray(Image.fromarray(data.astronaut()[0:300, 100:400]).resize((64, 64), Image.LANCZOS))


def reference_policy(preset: str):
    from portrait.core.config import load_preset
    from portrait.stages.train import TrainPolicy

    return TrainPolicy.from_section(load_preset(preset).section("train"), steps=1, rank=RANK, alpha=ALPHA,
                                    learning_rate=LR, flip=False, batch_size=1, validation_seeds=[],
                                    checkpoint_every=1000, mixed_precision="no", max_sequence_length=SEQUENCE,
                                    seed=SEED, weighting_scheme="none", max_grad_norm=1.0)


def train_base_dir(settings, family: str) -> Path:
    """The tiny train base's diffusers folder (what the script's --pretrained_model_name_or_path names)."""
    from portrait.core.context import RunContext
    from portrait.flows.train import train_base

    ctx = RunContext.create(settings, preset=FAMILIES[family][0])
    return ctx.resolve(train_base(ctx)).root


def our_run(settings, family: str) -> tuple[Any, Any]:
    """(run, inputs): our FlowRun after setup with the filled LoRA and encoded caches, and the
    draws of its step 0 (noise, u, latent eps) that the reference is fed."""
    from portrait.core.cache import ModelCache
    from portrait.core.context import RunContext
    from portrait.core.loaders import load_pipeline
    from portrait.core.tiny.lora import fill_lora
    from portrait.flows.train import train_base
    from portrait.stages.train import TrainData, TrainModels
    from portrait.stages.train_flow import setup_flow_training, step_inputs

    preset = FAMILIES[family][0]
    ctx = RunContext.create(settings, preset=preset)
    pipe = load_pipeline(dataclasses.replace(ctx, cache=ModelCache()), train_base(ctx))
    models = TrainModels(family, pipe)
    data = TrainData((reference_image(),), (PROMPT,), "sks", "person")
    run = setup_flow_training(models, data, reference_policy(preset), total=1)
    fill_lora(models.denoiser, SEED)
    run.prefill(0)
    return run, step_inputs(run, 0)


def our_step(run, inputs) -> tuple[float, dict[str, Any]]:
    """Our loss and LoRA gradients (before clipping) for the given draws."""
    from portrait.stages.train_flow import flow_loss, lora_parameters

    run.models.denoiser.train()
    run.optimizer.zero_grad(set_to_none=True)
    loss = flow_loss(run, inputs)
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in lora_parameters(run.models.denoiser).items()}
    return float(loss.detach()), grads


def script_args(family: str, model_dir: Path, data_dir: Path, out_dir: Path) -> list[str]:
    """diffusers' script's command line for the same step (its defaults otherwise)."""
    return ["--pretrained_model_name_or_path", str(model_dir), "--instance_data_dir", str(data_dir),
            "--instance_prompt", PROMPT, "--output_dir", str(out_dir), "--resolution", "64",
            "--train_batch_size", "1", "--max_train_steps", "1", "--learning_rate", str(LR), "--rank", str(RANK),
            "--lora_alpha", str(int(ALPHA)), "--mixed_precision", "no", "--max_sequence_length", str(SEQUENCE),
            "--seed", str(SEED), "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
            "--weighting_scheme", "none", "--max_grad_norm", "1.0", *FAMILIES[family][2]]


# --- the reference's side (recording only) ---------------------------------------------------------


def script_source(diffusers: Path, ref_name: str, name: str) -> tuple[str, str]:
    """(source text, provenance) of examples/dreambooth/<name> in a checkout or a bare mirror."""
    rel = f"examples/dreambooth/{name}"
    if (diffusers / rel).is_file():
        return (diffusers / rel).read_text(), str(diffusers / rel)
    text = subprocess.run(["git", "--git-dir", str(diffusers), "show", f"{ref_name}:{rel}"], check=True,
                          capture_output=True, text=True).stdout
    commit = subprocess.run(["git", "--git-dir", str(diffusers), "rev-parse", ref_name], check=True,
                            capture_output=True, text=True).stdout.strip()
    return text, f"huggingface/diffusers@{commit} ({ref_name}) {rel}"


def reference_step(settings, family: str, inputs, diffusers: Path, workdir: Path,
                   ref_name: str = "v0.40.0") -> tuple[float, dict[str, Any]]:
    """diffusers' script's loss and LoRA gradients for our step's draws (see the module docstring)."""
    from PIL import Image

    data = workdir / f"data-{family}"
    data.mkdir(parents=True, exist_ok=True)
    Image.fromarray(reference_image()).save(data / "000.png")
    source, _provenance = script_source(diffusers, ref_name, FAMILIES[family][1])
    args = script_args(family, train_base_dir(settings, family), data, workdir / f"out-{family}")
    return run_reference(source, args, inputs, family, workdir)


class Captured(Exception):
    """Raised once the script's first step has its gradients: nothing after it matters."""


def run_reference(source: str, args: list[str], inputs, family: str, workdir: Path) -> tuple[float, dict]:
    """Run the script's main() for one step with our draws; return its loss and LoRA grads."""
    import accelerate
    import torch
    from diffusers.loaders.peft import PeftAdapterMixin
    from diffusers.models.autoencoders import vae as vae_module

    from portrait.core.tiny.lora import fill_lora

    path = workdir / "reference_script.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("reference_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    seen: dict = {}
    noise, u = inputs.noise.clone(), inputs.u.clone()
    eps = inputs.draws.eps.clone()
    originals = {"randn_like": torch.randn_like, "add_adapter": PeftAdapterMixin.add_adapter,
                 "backward": accelerate.Accelerator.backward, "clip": accelerate.Accelerator.clip_grad_norm_,
                 "sample": vae_module.DiagonalGaussianDistribution.sample}

    def randn_like(tensor, *a, **kw):
        if tuple(tensor.shape) == tuple(noise.shape):
            seen["noise"] = True
            return noise.to(tensor.device, tensor.dtype).clone()
        return originals["randn_like"](tensor, *a, **kw)

    def density(**kw):
        seen["u"] = True
        return u.clone()

    def add_adapter(self, *a, **kw):
        originals["add_adapter"](self, *a, **kw)
        fill_lora(self, SEED)
        seen["transformer"] = self

    def backward(self, loss, **kw):
        seen["loss"] = float(loss.detach())
        return originals["backward"](self, loss, **kw)

    def clip(self, parameters, *a, **kw):
        transformer = seen["transformer"]
        seen["grads"] = {n: p.grad.detach().clone() for n, p in transformer.named_parameters() if "lora_" in n}
        raise Captured()

    def sample(self, generator=None):
        seen["eps"] = True
        return self.mean + self.std * eps.to(self.mean.device, self.mean.dtype)

    torch.randn_like = randn_like
    module.compute_density_for_timestep_sampling = density
    PeftAdapterMixin.add_adapter = add_adapter
    accelerate.Accelerator.backward = backward
    accelerate.Accelerator.clip_grad_norm_ = clip
    vae_module.DiagonalGaussianDistribution.sample = sample
    try:
        # As under `if __name__ == "__main__":` (some helpers of the scripts read the global `args`).
        module.args = module.parse_args(args)
        module.main(module.args)
    except Captured:
        pass
    finally:
        torch.randn_like = originals["randn_like"]
        PeftAdapterMixin.add_adapter = originals["add_adapter"]
        accelerate.Accelerator.backward = originals["backward"]
        accelerate.Accelerator.clip_grad_norm_ = originals["clip"]
        vae_module.DiagonalGaussianDistribution.sample = originals["sample"]
    if not (seen.get("noise") and seen.get("u") and "grads" in seen):
        raise SystemExit(f"{family}: the script's step did not take our draws ({sorted(seen)})")
    if family == "flux" and not seen.get("eps"):
        raise SystemExit("flux: the script did not sample the latent distribution")
    return seen["loss"], seen["grads"]
