"""Skin retouch: edge-preserving smoothing inside a skin mask, with texture kept.

A frequency-separation retouch as portrait retouchers do it: the low frequencies (blotches,
uneven tone) are replaced by an edge-preserving bilateral filter of the image, and a share
of the finest frequencies (pores, grain) is added back so skin does not turn to plastic.
The change is weighted by `strength` and by a skin mask that excludes eyes, brows and lips
(and hair, which lies outside the face outline), so every pixel outside the mask is
returned exactly as it came in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Mapping, Sequence

import numpy as np
from pydantic import Field

from portrait.core.declare import policy_from
from portrait.core.errors import bad_file
from portrait.core.facemask import PARSED_SKIN, face_regions, feather, parsed_mask
from portrait.core.types import FaceObservation


@dataclass(frozen=True)
class RetouchPolicy:
    """Settings from the preset's `finish.retouch` section (the declaration: type, default, bounds)."""

    SECTION: ClassVar[str] = "finish.retouch"

    strength: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5  # 0 = untouched, 1 = fully smoothed skin
    texture: Annotated[float, Field(ge=0.0, le=1.0)] = 0.35  # share of the fine detail (pores) kept in the smoothed skin
    sigma_color: Annotated[float, Field(gt=0.0)] = 20.0  # bilateral range sigma in 8-bit levels: larger merges more tones
    smoothing: Annotated[float, Field(gt=0.0)] = 1 / 45  # bilateral spatial sigma as a fraction of the face size
    feather: Annotated[float, Field(ge=0.0)] = 1 / 30  # mask edge softness as a fraction of the face size

    @classmethod
    def from_section(cls, section: Mapping[str, Any], where: str = "preset finish.retouch") -> "RetouchPolicy":
        return policy_from(cls, section, where)


@dataclass(frozen=True)
class Retouched:
    image: np.ndarray
    mask: np.ndarray  # float32 HxW in [0, 1]: how much each pixel was retouched (before strength)


def skin_mask(image_shape: tuple[int, ...], faces: Sequence[FaceObservation], policy: RetouchPolicy,
              parsing: np.ndarray | None = None) -> np.ndarray:
    """The soft skin mask of every face: face outline minus eyes, brows and lips.

    With a face-parsing label map the skin is what the parser labels skin or nose (so hair
    over the forehead, glasses and ears are excluded too); otherwise it comes from landmarks.
    """
    mask = np.zeros(image_shape[:2], np.float32)
    for face in faces:
        regions = face_regions(image_shape, face)
        skin = regions.skin if parsing is None else parsed_mask(parsing, PARSED_SKIN) & _grow_box(face, image_shape)
        mask = np.maximum(mask, feather(skin, regions.size * policy.feather, inside=True))
    return mask


def _grow_box(face: FaceObservation, shape: tuple[int, ...]) -> np.ndarray:
    """The face box doubled: parsed skin of this face, not of a neighbour or the neck below."""
    box = np.zeros(shape[:2], np.uint8)
    cx, cy = (face.box[0] + face.box[2]) / 2, (face.box[1] + face.box[3]) / 2
    half = max(face.width, face.height)
    box[max(int(cy - half), 0):max(int(cy + half * 0.75), 0), max(int(cx - half), 0):max(int(cx + half), 0)] = 1
    return box


def retouch(image: np.ndarray, faces: Sequence[FaceObservation], policy: RetouchPolicy,
            mask: np.ndarray | None = None, source: str = "image", parsing: np.ndarray | None = None) -> Retouched:
    """Smooth the skin of `faces` (or inside a given soft `mask`); nothing else changes."""
    _check(image, source)
    if mask is None:
        mask = skin_mask(image.shape, faces, policy, parsing)
    elif mask.shape != image.shape[:2]:
        raise bad_file(source, f"skin mask is {mask.shape[1]}x{mask.shape[0]}, the image {image.shape[1]}x{image.shape[0]}")
    if policy.strength <= 0 or not mask.any():
        return Retouched(image.copy(), mask)
    size = _face_size(faces, mask)
    out = image.copy()
    y0, y1, x0, x1 = _box(mask, margin=int(size * policy.smoothing * 3) + 2)
    crop = image[y0:y1, x0:x1]
    smoothed = smooth_skin(crop, size * policy.smoothing, policy.sigma_color, policy.texture)
    alpha = (mask[y0:y1, x0:x1] * policy.strength)[..., None]
    blended = crop.astype(np.float32) + alpha * (smoothed - crop.astype(np.float32))
    region = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    # where the mask is 0, keep the input bytes exactly (rounding must not leak outside)
    out[y0:y1, x0:x1] = np.where(alpha > 0, region, crop)
    return Retouched(out, mask)


def smooth_skin(image: np.ndarray, sigma_space: float, sigma_color: float, texture: float) -> np.ndarray:
    """Frequency separation; float32 result.

    The fine band (pores, grain) is split off with a small Gaussian; the rest is replaced by
    the same band of a bilateral-filtered image (tone evened out, strong edges such as the
    jaw line kept), and `texture` x the original fine band is added back.
    """
    import cv2

    sigma_space = max(float(sigma_space), 1.0)
    sigma_fine = max(sigma_space / 4, 0.8)
    source = image.astype(np.float32)
    fine = source - cv2.GaussianBlur(source, (0, 0), sigma_fine)
    base = cv2.bilateralFilter(image, d=0, sigmaColor=sigma_color, sigmaSpace=sigma_space).astype(np.float32)
    return cv2.GaussianBlur(base, (0, 0), sigma_fine) + texture * fine


def _face_size(faces: Sequence[FaceObservation], mask: np.ndarray) -> float:
    if faces:
        return float(max(max(f.width, f.height) for f in faces))
    return float(np.sqrt(np.count_nonzero(mask)))


def _box(mask: np.ndarray, margin: int) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    return (max(int(ys.min()) - margin, 0), min(int(ys.max()) + margin + 1, h),
            max(int(xs.min()) - margin, 0), min(int(xs.max()) + margin + 1, w))


def _check(image: np.ndarray, source: str) -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise bad_file(source, "not an HxWx3 uint8 RGB image")
    if min(image.shape[:2]) < 2:
        raise bad_file(source, f"image is {image.shape[1]}x{image.shape[0]}; too small to retouch")
