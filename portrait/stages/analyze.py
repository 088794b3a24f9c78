"""Analyze: faces and per-face quality measurements for each decoded photo.

For every face the analyzer finds, measure what ranking needs: sharpness (variance of the
Laplacian on the face crop, resampled to a fixed size so resolution does not bias it),
exposure (mean luminance and clipping on the face), face size relative to the photo, and
head pose (yaw, pitch, roll from the keypoints). Which face is the person is decided later
by rank, so every face is measured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from portrait.core.faces import FaceAnalyzer, head_pose
from portrait.core.types import FaceObservation, Photo

SHARPNESS_CROP = 128  # px: the face crop is resampled to this before the Laplacian
# Laplacian variance at which sharpness reaches 1 - 1/e (~0.63); measured on the real sample
# photos: the astronaut's face ~250-600, a Gaussian blur of sigma 3 ~10.
SHARPNESS_SCALE = 120.0


@dataclass(frozen=True)
class FaceQuality:
    sharpness: float  # [0, 1]
    exposure: float  # [0, 1], 1 = well exposed
    face_size: float  # [0, 1], 1 = the face spans at least a quarter of the shorter side
    face_px: float  # the face box's shorter side in original pixels
    yaw: float
    pitch: float
    roll: float


@dataclass(frozen=True)
class PhotoAnalysis:
    photo: Photo
    faces: tuple[FaceObservation, ...]  # largest first
    qualities: tuple[FaceQuality, ...]  # one per face


def face_crop(image: np.ndarray, face: FaceObservation, margin: float = 0.0) -> np.ndarray:
    h, w = image.shape[:2]
    x1, y1, x2, y2 = face.box
    mx, my = (x2 - x1) * margin, (y2 - y1) * margin
    x1, y1 = max(0, int(x1 - mx)), max(0, int(y1 - my))
    x2, y2 = min(w, int(math.ceil(x2 + mx))), min(h, int(math.ceil(y2 + my)))
    if x2 <= x1 or y2 <= y1:
        return image[0:1, 0:1]
    return image[y1:y2, x1:x2]


def sharpness(crop: np.ndarray) -> float:
    import cv2

    gray = cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY)
    gray = cv2.resize(gray, (SHARPNESS_CROP, SHARPNESS_CROP), interpolation=cv2.INTER_AREA)
    variance = float(cv2.Laplacian(gray, cv2.CV_64F).var())
    return 1.0 - math.exp(-variance / SHARPNESS_SCALE)


def exposure(crop: np.ndarray) -> float:
    """1 for a face whose mean luminance is mid-range and little clipped; 0 for black or blown out."""
    gray = crop.astype(np.float64) @ np.array([0.299, 0.587, 0.114]) / 255.0
    mean = float(gray.mean())
    clipped = float(((gray < 0.02) | (gray > 0.98)).mean())
    # faces sit naturally between ~0.3 and ~0.75 luminance; the score falls off outside
    if mean < 0.3:
        level = max(0.0, 1.0 - (0.3 - mean) / 0.25)
    elif mean > 0.75:
        level = max(0.0, 1.0 - (mean - 0.75) / 0.2)
    else:
        level = 1.0
    return float(max(0.0, level * (1.0 - 2.0 * clipped)))


def face_quality(image: np.ndarray, face: FaceObservation) -> FaceQuality:
    h, w = image.shape[:2]
    crop = face_crop(image, face)
    side = min(face.width, face.height)
    yaw, pitch, roll = head_pose(face.kps, (w, h))
    return FaceQuality(
        sharpness=sharpness(crop),
        exposure=exposure(crop),
        face_size=float(min(1.0, side / (0.25 * min(h, w)))),
        face_px=float(side),
        yaw=yaw,
        pitch=pitch,
        roll=roll,
    )


def analyze_photo(photo: Photo, analyzer: FaceAnalyzer) -> PhotoAnalysis:
    faces = tuple(analyzer.detect(photo.image))
    return PhotoAnalysis(photo, faces, tuple(face_quality(photo.image, f) for f in faces))


def analyze(photos: Sequence[Photo], analyzer: FaceAnalyzer,
            progress: Callable[[str, float, float], None] | None = None) -> tuple[PhotoAnalysis, ...]:
    results = []
    for i, photo in enumerate(photos):
        results.append(analyze_photo(photo, analyzer))
        if progress:
            progress("finding faces", i + 1, len(photos))
    return tuple(results)
