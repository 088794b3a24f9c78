"""The reference implementations' figures, stored as small fixtures so every machine checks against them.

The reference-equality tests (IR-SE50 and InfiniteYou's recipe against facexlib and ByteDance's
code, PuLID and PuLID-FLUX against ToTheBeginning/PuLID and BFL's FLUX code) feed a reference the
same tiny weights and inputs as our code and compare the outputs. The references live in fetched
mirrors (never vendored), which CI does not have, so each check's reference outputs are stored
here as numbers (`tests/fixtures/reference/<check>.npz`, float32) and every run compares our
code against them; nothing skips.

`scripts/reference_fixtures.py` regenerates them: it runs the same tests with
PORTRAIT_RECORD_REFERENCE=1, where `reference(name, compute)` runs the reference from the mirror
(a missing mirror is an error there, never a skip) and writes what it computed. The weights and
inputs both sides see are made by our deterministic seeded code (tiny stand-ins, seeded
tensors), so a fixture is a function of the repository alone.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "reference"
MIRRORS = Path(os.environ.get("PORTRAIT_MIRRORS", "/work/.mirror"))


def recording() -> bool:
    return os.environ.get("PORTRAIT_RECORD_REFERENCE") == "1"


def mirror(name: str) -> Path:
    """A fetched reference repository (`owner+name`, a bare git directory); only asked for when recording."""
    path = MIRRORS / name / "repo"
    if not (path / "HEAD").exists():
        raise RuntimeError(f"recording reference fixtures needs the mirror {path} (fetch github:{name.replace('+', '/')})")
    return path


def _array(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().float().cpu().numpy()
    return np.asarray(value, dtype=np.float32)


def reference(name: str, compute: Callable[[], Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """Check `name`'s reference outputs: computed by the reference and written (recording), else read."""
    path = FIXTURES / f"{name}.npz"
    if recording():
        values = {key: _array(value) for key, value in compute().items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, **values)
        return values
    if not path.is_file():
        raise AssertionError(f"{path} is missing: run scripts/reference_fixtures.py with the mirrors fetched")
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


def max_diff(ours: Any, theirs: Any) -> float:
    a, b = _array(ours), _array(theirs)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max())


def seeded_state(module, seed: int) -> dict:
    """Every tensor of `module`'s state dict drawn from one seeded generator in sorted key order
    (so a reference module with the same keys gets the same values), scaled by 1/sqrt(fan-in);
    batch-norm variances positive, counters kept."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    state = module.state_dict()
    out = {}
    for name in sorted(state):
        value = state[name]
        if name.endswith("num_batches_tracked"):
            out[name] = value.clone()
        elif name.endswith("running_var"):
            out[name] = 0.5 + torch.rand(value.shape, generator=gen)
        else:
            fan_in = value[0].numel() if value.ndim > 1 else max(1, value.numel() if value.ndim else 1)
            out[name] = torch.randn(value.shape, generator=gen) / fan_in ** 0.5
    return out
