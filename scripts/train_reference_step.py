"""Write the reference-step fixtures: one training step of diffusers' own LoRA script per
flow-matching family, on our tiny stand-ins, with the loss and every LoRA gradient recorded.

    python scripts/train_reference_step.py --diffusers /work/.mirror/huggingface+diffusers/repo \
        [--ref v0.40.0] [--families flux,flux2-klein,zimage] [--out tests/fixtures/train_reference]

`--diffusers` is a diffusers checkout or a bare git mirror (then `--ref` picks the commit); the
script files are examples/dreambooth/train_dreambooth_lora_{flux,flux2_klein,z_image}.py, run
in this process by their own `main(parse_args(...))`: nothing of them is copied into portrait.

How both sides get the same step (tests/train_reference.py builds ours):
- the same weights: both load the same tiny train-base folder; after the script's
  `transformer.add_adapter(...)` (patched to call through) every LoRA weight is overwritten by
  `portrait.core.tiny.lora.fill_lora`, as ours is after setup;
- the same batch: one 64 x 64 PNG in --instance_data_dir (ours reads the same pixels), the
  same prompt, no flips, batch 1, fp32;
- the same noise: our step's draws come from its (seed, step) generator
  (`portrait.stages.train_flow.step_inputs`); the script's draws are replaced by those tensors:
  `torch.randn_like` returns our noise for the model input's shape, the script's module-level
  `compute_density_for_timestep_sampling` returns our u, and for FLUX.1 (whose script samples
  the latent) `DiagonalGaussianDistribution.sample` returns mean + std * our eps.
- what is recorded: `Accelerator.backward` records the loss; `Accelerator.clip_grad_norm_` (called
  before clipping) records the LoRA gradients and stops the script.

The fixture is `<family>.safetensors`: every gradient as `grad.<parameter name>`, the loss and
the provenance in its metadata. tests/test_train_flow_reference.py compares ours with it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import train_reference as ref  # noqa: E402  (tests/train_reference.py: our side of the step)


class Captured(Exception):
    """Raised once the script's first step has its gradients: nothing after it matters."""


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
        fill_lora(self, ref.SEED)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--diffusers", required=True, help="a diffusers checkout or bare git mirror")
    parser.add_argument("--ref", default="v0.40.0", help="the commit or tag of a bare mirror (default v0.40.0)")
    parser.add_argument("--families", default=",".join(ref.FAMILIES))
    parser.add_argument("--out", default=str(ROOT / "tests" / "fixtures" / "train_reference"))
    args = parser.parse_args()

    import torch
    from PIL import Image
    from safetensors.torch import save_file

    from portrait.core.config import Settings
    from portrait.core.registry import Registry
    from portrait.core.registry import make_tiny

    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        settings = Settings(home=tmp / "home", preset="tiny", device="cpu")
        registry = Registry.load()
        for family in args.families.split(","):
            preset, script, _extra = ref.FAMILIES[family]
            from portrait.core.context import RunContext
            from portrait.flows.train import train_base

            ctx = RunContext.create(Settings(home=settings.home, preset=preset, device="cpu"), preset=preset)
            make_tiny(settings, registry, only={registry.stand_in(train_base(ctx), True).id})
            settings_f = Settings(home=settings.home, preset=preset, device="cpu")
            run, inputs = ref.our_run(settings_f, family)
            ours_loss, ours_grads = ref.our_step(run, inputs)
            data_dir = tmp / f"data-{family}"
            data_dir.mkdir()
            Image.fromarray(ref.reference_image()).save(data_dir / "000.png")
            source, provenance = script_source(Path(args.diffusers), args.ref, script)
            loss, grads = run_reference(source, ref.script_args(family, ref.train_base_dir(settings_f, family),
                                                                data_dir, tmp / f"out-{family}"),
                                        inputs, family, tmp)
            if set(grads) != set(ours_grads):
                raise SystemExit(f"{family}: LoRA parameters differ: {sorted(set(grads) ^ set(ours_grads))[:4]}")
            worst = max(float((grads[k] - ours_grads[k]).abs().max()) for k in grads)
            print(f"{family}: script loss {loss:.8f}, ours {ours_loss:.8f} (|diff| {abs(loss - ours_loss):.2e}); "
                  f"{len(grads)} LoRA grads, max |diff| {worst:.2e}")
            meta = {"loss": repr(loss), "script": provenance, "family": family, "preset": preset,
                    "args": json.dumps(ref.script_args(family, Path("MODEL"), Path("DATA"), Path("OUT")))}
            save_file({f"grad.{k}": v.contiguous() for k, v in grads.items()}, str(out / f"{family}.safetensors"),
                      metadata=meta)


if __name__ == "__main__":
    main()
