"""Our flow-matching training step equals diffusers' reference scripts' step (issue 28).

For each family, one step of ours on the tiny train base (same weights, batch, prompt, noise,
timestep, LoRA) against the loss and LoRA gradients diffusers' own script computed for that
step: examples/dreambooth/train_dreambooth_lora_flux.py, train_dreambooth_lora_flux2_klein.py
and train_dreambooth_lora_z_image.py, run by scripts/train_reference_step.py from a fetched
mirror (v0.40.0). The fixtures are figures, not code, so the test runs everywhere; the script
feeds the reference our step's own draws (see its docstring), and wrote these with
max |diff| 0.0 on the loss and every gradient.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import train_reference as ref

FIXTURES = Path(__file__).parent / "fixtures" / "train_reference"


def fixture(family: str) -> tuple[float, dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(FIXTURES / f"{family}.safetensors"), "pt") as fh:
        meta = fh.metadata()
        grads = {k.removeprefix("grad."): fh.get_tensor(k) for k in fh.keys()}
    return float(meta["loss"]), grads, meta


@pytest.mark.parametrize("family", list(ref.FAMILIES))
def test_one_step_equals_diffusers_reference_script(tiny_home, family):
    from portrait.core.config import Settings

    loss_ref, grads_ref, meta = fixture(family)
    assert meta["family"] == family and ref.FAMILIES[family][1] in meta["script"]
    settings = Settings(home=tiny_home.home, preset=ref.FAMILIES[family][0], device="cpu")
    run, inputs = ref.our_run(settings, family)
    loss, grads = ref.our_step(run, inputs)

    assert set(grads) == set(grads_ref)
    assert abs(loss - loss_ref) <= 1e-6 * max(1.0, abs(loss_ref)), (loss, loss_ref)
    for name, expected in grads_ref.items():
        torch.testing.assert_close(grads[name], expected, rtol=1e-4, atol=1e-6, msg=name)
    assert sum(float(g.abs().sum()) for g in grads.values()) > 0  # every LoRA weight is non-zero (fill_lora)

    # Sensitivity: another timestep draw gives another loss, so the comparison can fail.
    from dataclasses import replace

    moved, _ = ref.our_step(run, replace(inputs, u=(inputs.u + 0.37) % 1.0))
    assert abs(moved - loss_ref) > 1e-4
