"""Import instantX-research/InstantID's own code for the InstantID reference checks (never vendored).

Only recording (`scripts/reference_fixtures.py`, tests/reference_fixtures.py) imports it: the
mirror is fetched with the project's `fetch` tool, and recording without it is an error. The
files used are the ones its README runs: `pipeline_stable_diffusion_xl_instantid.py`
(`StableDiffusionXLInstantIDPipeline` and `draw_kps`) and `ip_adapter/` (its `Resampler` and
IP attention processors).

As published the pipeline file does not import on diffusers 0.42, and its projection is sized for
the real checkpoint only. Two shims, both here and neither in what it computes (measured on
diffusers 0.42.1: with these two, its `__call__` and denoising loop run unchanged):

1. It imports `MultiControlNetModel` from `diffusers.pipelines.controlnet.multicontrolnet`, a module
   diffusers moved to `diffusers.models.controlnets.multicontrolnet`: the old name is aliased to
   the moved module while the reference is imported.
2. `set_image_proj_model` builds `Resampler(dim=1280, heads=20, ...)`, hard-coded for the real
   InstantID checkpoint; our tiny checkpoint's Resampler is `dim` wide with `dim // 64` heads
   (diffusers reads heads as rows // 64). `sized_resampler` binds the pipeline module's
   `Resampler` name to the reference's own class with those two sizes read from the checkpoint,
   every other argument as the pipeline passes it.
"""

from __future__ import annotations

import contextlib
import importlib
import subprocess
import sys
import types
from pathlib import Path

from reference_fixtures import mirror

MIRROR = "instantX-research+InstantID"
MOVED = "diffusers.pipelines.controlnet.multicontrolnet"


def checkout(target: Path) -> Path:
    """A work tree of the files the reference's pipeline needs (the mirror is a bare git directory)."""
    archive = subprocess.run(["git", "--git-dir", str(mirror(MIRROR)), "archive", "HEAD",
                              "pipeline_stable_diffusion_xl_instantid.py", "ip_adapter"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


@contextlib.contextmanager
def reference_modules(target: Path):
    """(pipeline module, resampler module) of the reference, importable for the block's duration."""
    from diffusers.models.controlnets import multicontrolnet

    root = checkout(target)
    added = MOVED not in sys.modules
    if added:  # shim 1: the module path the reference imports from
        alias = types.ModuleType(MOVED)
        alias.MultiControlNetModel = multicontrolnet.MultiControlNetModel
        sys.modules[MOVED] = alias
    sys.path.insert(0, str(root))
    try:
        yield (importlib.import_module("pipeline_stable_diffusion_xl_instantid"),
               importlib.import_module("ip_adapter.resampler"))
    finally:
        sys.path.remove(str(root))
        for name in [n for n in sys.modules if n == "pipeline_stable_diffusion_xl_instantid"
                     or n.split(".")[0] == "ip_adapter"]:
            del sys.modules[name]
        if added:
            sys.modules.pop(MOVED, None)


def sized_resampler(resampler_module, image_proj: dict):
    """Shim 2: the reference's Resampler class at the checkpoint's width and head count."""
    dim = int(image_proj["latents"].shape[-1])
    heads = int(image_proj["layers.0.0.to_q.weight"].shape[0]) // 64

    def build(**kwargs):
        return resampler_module.Resampler(**{**kwargs, "dim": dim, "heads": heads})

    return build
