"""Prepare: align each kept face with its 5 keypoints and crop a square head-and-shoulders
training image at the preset's resolution, with optional background and skin hooks.

The crop maps the arcface keypoint template onto a square where the face spans
`face_fraction` of the width and the eyes sit at `eye_height` of the height, which leaves
hair, neck and shoulders in frame (what EasyPhoto and FaceChain train on). Regions outside
the photo are filled by edge replication rather than black, which a LoRA would learn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Callable, ClassVar, Sequence

import numpy as np
from pydantic import Field

from portrait.core.faces import ARCFACE_TEMPLATE, similarity_transform
from portrait.core.types import FaceObservation, Photo

ImageHook = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class PreparePolicy:
    """The crop settings of the preset's `prepare` section (the declaration: type, default, bounds)."""

    SECTION: ClassVar[str] = "prepare"

    resolution: Annotated[int, Field(ge=8, le=4096)] = 512  # px; the training crops' side
    face_fraction: Annotated[float, Field(gt=0.0, le=1.0)] = 0.42  # the keypoint template's 112-px box as a fraction of the crop width
    eye_height: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.40  # where the eyes sit, as a fraction of the crop height


@dataclass(frozen=True)
class PrepareHooks:
    """Optional stages applied to each aligned crop (background whitening, skin retouch)."""

    whiten_background: ImageHook | None = None
    retouch: ImageHook | None = None


@dataclass(frozen=True)
class PreparedImage:
    source: str
    image: np.ndarray  # resolution x resolution RGB uint8
    matrix: np.ndarray  # 2x3 affine from the original photo to the crop


def crop_template(size: int, policy: PreparePolicy) -> np.ndarray:
    """The 5 keypoint positions in a `size` square crop."""
    scale = size * policy.face_fraction / 112.0
    points = (ARCFACE_TEMPLATE - ARCFACE_TEMPLATE[0:2].mean(0)) * scale
    return (points + np.array([size / 2.0, size * policy.eye_height])).astype(np.float32)


def align_crop(image: np.ndarray, kps: np.ndarray, size: int, policy: PreparePolicy) -> tuple[np.ndarray, np.ndarray]:
    """The aligned square crop and its 2x3 matrix. Big downscales go through INTER_AREA first,
    because warpAffine samples without low-pass filtering and would alias."""
    import cv2

    kps = np.asarray(kps, np.float32)
    matrix = similarity_transform(kps, crop_template(size, policy))
    shrink = float(np.sqrt(abs(np.linalg.det(matrix[:, :2]))))
    source, points = image, kps
    if shrink < 0.5:
        factor = shrink * 2.0
        h, w = image.shape[:2]
        source = cv2.resize(image, (max(1, round(w * factor)), max(1, round(h * factor))), interpolation=cv2.INTER_AREA)
        points = kps * np.array([source.shape[1] / w, source.shape[0] / h], np.float32)
        matrix_small = similarity_transform(points, crop_template(size, policy))
        crop = cv2.warpAffine(source, matrix_small, (size, size), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REPLICATE)
        return crop, matrix
    crop = cv2.warpAffine(source, matrix, (size, size), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_REPLICATE)
    return crop, matrix


def prepare_one(photo: Photo, face: FaceObservation, policy: PreparePolicy, hooks: PrepareHooks = PrepareHooks(),
                size: int | None = None) -> PreparedImage:
    crop, matrix = align_crop(photo.image, face.kps, size or policy.resolution, policy)
    for hook in (hooks.whiten_background, hooks.retouch):
        if hook is not None:
            crop = np.ascontiguousarray(hook(crop), dtype=np.uint8)
    return PreparedImage(photo.source, crop, matrix)


def prepare(items: Sequence[tuple[Photo, FaceObservation]], policy: PreparePolicy,
            hooks: PrepareHooks = PrepareHooks()) -> tuple[PreparedImage, ...]:
    return tuple(prepare_one(photo, face, policy, hooks) for photo, face in items)
