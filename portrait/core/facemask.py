"""Face region masks from landmarks: the whole face, its skin, and the features.

Fusion and skin retouch both need to know where skin, eyes, brows, nose and lips are. With
68-point landmarks (dlib's iBUG layout) the regions are polygons of the points; with only
the 5 keypoints every backend gives, they are ellipses placed by the eye distance and the
eye line, which is coarser but never empty. A face-parsing model can replace both where
one is installed; these geometric masks keep the pipeline working without it.

Masks are uint8 {0, 1} arrays of the image's height and width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .types import FaceObservation

# iBUG 68-point index ranges
JAW = slice(0, 17)
BROW_L, BROW_R = slice(17, 22), slice(22, 27)
NOSE = slice(27, 36)
EYE_L, EYE_R = slice(36, 42), slice(42, 48)
MOUTH_OUTER = slice(48, 60)
FOREHEAD_RAISE = 0.28  # forehead top above the brows, as a fraction of the brow-to-chin height


@dataclass(frozen=True)
class FaceRegions:
    face: np.ndarray  # everything inside the face outline (forehead included)
    eyes: np.ndarray
    brows: np.ndarray
    nose: np.ndarray
    mouth: np.ndarray
    size: float  # a length scale for the face in px (the eye-to-mouth-centre distance x 2)

    @property
    def features(self) -> np.ndarray:
        """Eyes, brows, nose and mouth: what carries identity in fusion."""
        return np.maximum.reduce([self.eyes, self.brows, self.nose, self.mouth])

    @property
    def skin(self) -> np.ndarray:
        """Face minus eyes, brows and lips (the nose is skin for retouching)."""
        return (self.face & ~(self.eyes | self.brows | self.mouth)).astype(np.uint8)


def face_regions(shape: tuple[int, ...], face: FaceObservation) -> FaceRegions:
    landmarks = face.landmarks if face.landmarks is not None and len(face.landmarks) == 68 else None
    return regions_from_points(shape, face.kps, landmarks)


def regions_from_points(shape: tuple[int, ...], kps: np.ndarray, landmarks68: np.ndarray | None = None) -> FaceRegions:
    h, w = shape[:2]
    kps = np.asarray(kps, dtype=np.float64)
    if landmarks68 is not None:
        return _regions_68((h, w), np.asarray(landmarks68, dtype=np.float64), _size(kps))
    return _regions_5((h, w), kps)


def _size(kps: np.ndarray) -> float:
    eyes, mouth = kps[:2].mean(0), kps[3:5].mean(0)
    return max(2.0 * float(np.linalg.norm(mouth - eyes)), 1.0)


def _blank(shape: tuple[int, int]) -> np.ndarray:
    return np.zeros(shape, np.uint8)


def _hull(shape: tuple[int, int], points: np.ndarray) -> np.ndarray:
    import cv2

    mask = _blank(shape)
    cv2.fillConvexPoly(mask, cv2.convexHull(np.round(points).astype(np.int32)), 1)
    return mask


def _grow(mask: np.ndarray, radius: float) -> np.ndarray:
    import cv2

    r = max(int(round(radius)), 0)
    if r == 0:
        return mask
    return cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1)))


def _regions_68(shape: tuple[int, int], pts: np.ndarray, size: float) -> FaceRegions:
    import cv2

    brows = np.concatenate([pts[BROW_L], pts[BROW_R]])
    chin = pts[8]
    up = brows.mean(0) - chin
    forehead = brows + up * FOREHEAD_RAISE
    face = _hull(shape, np.concatenate([pts[JAW], forehead]))
    eye_pad = 0.06 * size
    eyes = _grow(_hull(shape, pts[EYE_L]) | _hull(shape, pts[EYE_R]), eye_pad)
    brow_mask = _blank(shape)
    thickness = max(int(round(0.07 * size)), 1)
    for part in (BROW_L, BROW_R):
        cv2.polylines(brow_mask, [np.round(pts[part]).astype(np.int32)], False, 1, thickness)
    nose = _grow(_hull(shape, pts[NOSE]), 0.03 * size)
    mouth = _grow(_hull(shape, pts[MOUTH_OUTER]), 0.03 * size)
    return FaceRegions(face & 1, eyes, brow_mask, nose, mouth, size)


def _ellipse(shape: tuple[int, int], centre: np.ndarray, axes: tuple[float, float], angle: float) -> np.ndarray:
    import cv2

    mask = _blank(shape)
    cv2.ellipse(mask, (int(round(centre[0])), int(round(centre[1]))),
                (max(int(round(axes[0])), 1), max(int(round(axes[1])), 1)), angle, 0, 360, 1, -1)
    return mask


def _regions_5(shape: tuple[int, int], kps: np.ndarray) -> FaceRegions:
    eye_l, eye_r, nose_tip, mouth_l, mouth_r = kps
    d = max(float(np.linalg.norm(eye_r - eye_l)), 1.0)
    angle = math.degrees(math.atan2(eye_r[1] - eye_l[1], eye_r[0] - eye_l[0]))
    eyes_mid, mouth_mid = (eye_l + eye_r) / 2, (mouth_l + mouth_r) / 2
    down = (mouth_mid - eyes_mid) / max(float(np.linalg.norm(mouth_mid - eyes_mid)), 1.0)
    # Proportions of an average frontal face in units of the eye distance d.
    face = _ellipse(shape, eyes_mid + down * 0.45 * d, (1.0 * d, 1.45 * d), angle)
    eyes = _ellipse(shape, eye_l, (0.3 * d, 0.17 * d), angle) | _ellipse(shape, eye_r, (0.3 * d, 0.17 * d), angle)
    brows = (_ellipse(shape, eye_l - down * 0.32 * d, (0.34 * d, 0.1 * d), angle)
             | _ellipse(shape, eye_r - down * 0.32 * d, (0.34 * d, 0.1 * d), angle))
    nose = _ellipse(shape, (eyes_mid + nose_tip) / 2 + down * 0.05 * d, (0.22 * d, 0.45 * d), angle)
    half_mouth = max(float(np.linalg.norm(mouth_r - mouth_l)) / 2, 0.2 * d)
    mouth = _ellipse(shape, mouth_mid, (half_mouth + 0.08 * d, 0.2 * d), angle)
    return FaceRegions(face, eyes, brows, nose, mouth, _size(kps))


# Face-parsing labels (portrait.core.parsing.LABELS) that make up each region.
PARSED_SKIN = (1, 10)  # skin, nose
PARSED_FACE = (1, 2, 3, 4, 5, 10, 11, 12, 13)  # skin, brows, eyes, nose, mouth, lips (no hair, glasses, ears)


def parsed_mask(labels: np.ndarray, wanted: tuple[int, ...]) -> np.ndarray:
    """A {0, 1} mask of the pixels whose parsing label is in `wanted`."""
    return np.isin(labels, wanted).astype(np.uint8)


def feather(mask: np.ndarray, radius: float, inside: bool = True) -> np.ndarray:
    """A soft float32 mask in [0, 1].

    `inside=True` erodes before blurring and clips to the original mask, so the soft edge
    lies within the region and every pixel outside it stays exactly 0 (retouch must not
    touch anything outside the skin); `inside=False` blurs symmetrically across the edge.
    """
    import cv2

    sigma = max(float(radius), 0.0)
    if sigma < 0.5:
        return mask.astype(np.float32)
    binary = mask.astype(np.uint8)
    core = cv2.erode(binary, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * int(sigma) + 1,) * 2)) if inside else binary
    soft = cv2.GaussianBlur(core.astype(np.float32), (0, 0), sigma)
    return soft * binary if inside else soft
