"""Our flow-matching training step equals diffusers' reference scripts' step (issue 28).

For each family, one step of ours on the tiny train base (same weights, batch, prompt, noise,
timestep, LoRA) against the loss and LoRA gradients diffusers' own script computed for that
step: examples/dreambooth/train_dreambooth_lora_flux.py, train_dreambooth_lora_flux2_klein.py
and train_dreambooth_lora_z_image.py at v0.40.0, run from a fetched mirror when
scripts/reference_fixtures.py records (tests/train_reference.py says how the script is fed our
step's own draws). The stored figures are numbers, so the check runs everywhere; they were
recorded with max |diff| 0.0 on the loss and on every gradient.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

import train_reference as ref
from reference_fixtures import mirror, reference


@pytest.mark.parametrize("family", list(ref.FAMILIES))
def test_one_step_equals_diffusers_reference_script(tiny_home, tmp_path, family):
    from portrait.core.config import Settings

    settings = Settings(home=tiny_home.home, preset=ref.FAMILIES[family][0], device="cpu")
    run, inputs = ref.our_run(settings, family)
    loss, grads = ref.our_step(run, inputs)

    def script_step():
        script_loss, script_grads = ref.reference_step(settings, family, inputs, mirror("huggingface+diffusers"),
                                                       tmp_path)
        return {"loss": np.array([script_loss]), **{f"grad.{k}": v for k, v in script_grads.items()}}

    stored = reference(f"train_step_{family.replace('-', '_')}", script_step)
    loss_ref = float(stored["loss"][0])
    grads_ref = {k.removeprefix("grad."): torch.from_numpy(v) for k, v in stored.items() if k.startswith("grad.")}
    assert set(grads) == set(grads_ref)
    assert abs(loss - loss_ref) <= 1e-6 * max(1.0, abs(loss_ref)), (loss, loss_ref)
    for name, expected in grads_ref.items():
        torch.testing.assert_close(grads[name], expected, rtol=1e-4, atol=1e-6, msg=name)
    assert all(float(g.abs().sum()) > 0 for g in grads.values())  # every LoRA weight is non-zero (fill_lora)

    # Sensitivity: another timestep draw gives another loss, so the comparison can fail.
    moved, _ = ref.our_step(run, replace(inputs, u=(inputs.u + 0.37) % 1.0))
    assert abs(moved - loss_ref) > 1e-4
