"""Background whitening for training photos (EasyPhoto and FaceChain both do it).

A LoRA learns whatever the training crops share; a person photographed against the same
wall in every shot teaches the wall. With `prepare.whiten_background: true` each aligned
crop is segmented (the preset's `background_segmenter`, U^2-Net from rembg's release,
Apache-2.0) and everything that is not the person is blended to white through the soft mask.

The ONNX runs through onnxruntime directly, with rembg's pre- and post-processing (resize to
320, divide by the max, ImageNet mean/std; min-max normalise the first side output):
rembg itself is not a dependency because it fetches its own models at run time and pulls in
a large set of packages for what is ten lines here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Mapping

import numpy as np
from pydantic import Field, StrictBool

from portrait.core.declare import policy_from
from portrait.core.archs.segmenter import MEAN, SIZE, STD, Segmenter  # noqa: F401

Level = Annotated[int, Field(ge=0, le=255)]



@dataclass(frozen=True)
class BackgroundPolicy:
    """The background settings of the preset's `prepare` section (the declaration: type, default, bounds)."""

    SECTION: ClassVar[str] = "prepare"

    whiten: StrictBool = field(default=False, metadata={"key": "whiten_background"})  # white background behind the person in the training crops (U^2-Net mask, as EasyPhoto/FaceChain)
    color: tuple[Level, Level, Level] = field(default=(255, 255, 255), metadata={"key": "background_color"})  # RGB of the whitened background

    @classmethod
    def from_section(cls, section: Mapping[str, Any], where: str = "preset prepare", shared=()) -> "BackgroundPolicy":
        return policy_from(cls, section, where, shared=shared)


def load_segmenter(ctx, model_id: str) -> Segmenter:
    """The registry's background segmenter (tiny stand-in under a tiny preset), through the
    model door (kind "segmenter"), cached."""
    from portrait.core.models import load

    return load(ctx, model_id, "segmenter")


def whiten(image: np.ndarray, mask: np.ndarray, color: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
    """The person kept, the background blended to `color` through the soft mask."""
    alpha = mask.astype(np.float32)[..., None]
    out = image.astype(np.float32) * alpha + np.asarray(color, np.float32) * (1.0 - alpha)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
