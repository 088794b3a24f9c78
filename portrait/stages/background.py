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
from portrait.core.errors import bad_file
from portrait.core.models import builder

SIZE = 320  # U^2-Net's input side
Level = Annotated[int, Field(ge=0, le=255)]
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


@dataclass(frozen=True)
class BackgroundPolicy:
    """The background settings of the preset's `prepare` section (the declaration: type, default, bounds)."""

    SECTION: ClassVar[str] = "prepare"

    whiten: StrictBool = field(default=False, metadata={"key": "whiten_background"})  # white background behind the person in the training crops (U^2-Net mask, as EasyPhoto/FaceChain)
    color: tuple[Level, Level, Level] = field(default=(255, 255, 255), metadata={"key": "background_color"})  # RGB of the whitened background

    @classmethod
    def from_section(cls, section: Mapping[str, Any], where: str = "preset prepare", shared=()) -> "BackgroundPolicy":
        return policy_from(cls, section, where, shared=shared)


@dataclass
class Segmenter:
    session: Any  # onnxruntime.InferenceSession
    model_id: str
    license: str

    def mask(self, image: np.ndarray) -> np.ndarray:
        """Foreground probability, float32 HxW in [0, 1], for an RGB uint8 image."""
        import cv2

        h, w = image.shape[:2]
        x = cv2.resize(image, (SIZE, SIZE), interpolation=cv2.INTER_LANCZOS4).astype(np.float32)
        x = (x / max(float(x.max()), 1e-6) - MEAN) / STD
        feed = {self.session.get_inputs()[0].name: x.transpose(2, 0, 1)[None].astype(np.float32)}
        pred = self.session.run(None, feed)[0][0, 0]
        lo, hi = float(pred.min()), float(pred.max())
        pred = (pred - lo) / (hi - lo) if hi > lo else np.clip(pred, 0.0, 1.0)
        return np.clip(cv2.resize(pred.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR), 0.0, 1.0)


def load_segmenter(ctx, model_id: str) -> Segmenter:
    """The registry's background segmenter (tiny stand-in under a tiny preset), through the
    model door (kind "segmenter"), cached."""
    from portrait.core.models import load

    return load(ctx, model_id, "segmenter")


@builder("segmenter")
def _build_segmenter(source) -> Segmenter:
    """A U2-Net-style ONNX (one RGB input, a foreground map first) on `onnx_providers(ctx)`."""
    import onnxruntime

    from portrait.core.models import check_session, onnx_providers

    path = source.verified()
    providers = onnx_providers(source.ctx)
    try:
        session = onnxruntime.InferenceSession(str(path), providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types for a bad file
        raise bad_file(path, f"is not a loadable ONNX segmenter ({exc.__class__.__name__})") from None
    check_session(session, providers, path.name)
    return Segmenter(session, source.model_id, source.resolved.spec.license)


def whiten(image: np.ndarray, mask: np.ndarray, color: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
    """The person kept, the background blended to `color` through the soft mask."""
    alpha = mask.astype(np.float32)[..., None]
    out = image.astype(np.float32) * alpha + np.asarray(color, np.float32) * (1.0 - alpha)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
