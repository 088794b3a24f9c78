"""ControlNet preprocessors: canny, color/tile, openpose and depth maps, at generation size.

canny, color and tile are plain OpenCV. openpose and depth use controlnet-aux with the
lllyasviel/Annotators weights resolved through the registry (annotator-openpose,
annotator-midas).

Offline (tiny presets) there is no annotator: controlnet-aux hard-codes the full-size
OpenPose VGG body net and the DPT-hybrid MiDaS, so a "tiny" checkpoint would not load
through its classes (and a full-size random one is 200-500 MB of noise). Instead the
openpose map is drawn from our own face keypoints/landmarks with controlnet-aux's own
drawing functions (same colors, limb order and face-dot style as the annotator), which
is also what a portrait needs most: head pose and face layout. Depth has no offline
source except a depth map shipped with the template (`preprocessed: true`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np

from portrait.core.errors import BadInput
from portrait.core.formats.images import read_rgb  # noqa: F401  (backends call <stage>.read_rgb)
from portrait.core.archs.annotators import quiet_import
from portrait.core.types import FaceObservation


@dataclass(frozen=True)
class ControlImage:
    """One ready ControlNet input: the map (HxWx3 uint8) and its conditioning strength."""

    name: str
    image: np.ndarray
    strength: float
    start: float = 0.0
    end: float = 1.0
    source: str = ""  # how the map was made (annotator, landmarks, shipped, opencv)


def fit(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Center-crop to the target aspect, then resize: controls must match the latent grid."""
    h, w = image.shape[:2]
    target = width / height
    if w / h > target:
        new_w = int(round(h * target))
        x0 = (w - new_w) // 2
        image = image[:, x0 : x0 + new_w]
    elif w / h < target:
        new_h = int(round(w / target))
        y0 = (h - new_h) // 2
        image = image[y0 : y0 + new_h]
    interp = cv2.INTER_AREA if image.shape[1] > width else cv2.INTER_CUBIC
    return np.ascontiguousarray(cv2.resize(image, (width, height), interpolation=interp))


def canny(image: np.ndarray, low: int = 100, high: int = 200) -> np.ndarray:
    """White edges on black, three channels (what the canny ControlNets were trained on)."""
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    edges = cv2.Canny(gray, low, high)
    return np.repeat(edges[:, :, None], 3, axis=2)


def color_map(image: np.ndarray, block: int = 64) -> np.ndarray:
    """EasyPhoto's color control: a 1/block mosaic of the image, blown back up with nearest."""
    h, w = image.shape[:2]
    # INTER_AREA averages each block (cubic would sample a few pixels and alias).
    small = cv2.resize(image, (max(1, w // block), max(1, h // block)), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)


def tile(image: np.ndarray, blur: int = 0) -> np.ndarray:
    """The tile ControlNet takes the image itself (optionally softened so it re-invents detail)."""
    if blur <= 0:
        return image.copy()
    k = blur | 1
    return cv2.GaussianBlur(image, (k, k), 0)


# --- openpose ------------------------------------------------------------------------------


def _body_from_face(face: FaceObservation, width: int, height: int) -> list:
    """OpenPose's 18 body keypoints (COCO order) that a face determines, normalized to [0, 1].

    Eyes and nose are measured; ears, neck and shoulders are placed by head proportions
    (ear ~0.55 eye spacing outside each eye, neck ~1.1 face heights below the nose,
    shoulders ~1.4 face widths either side of the neck), enough for a head-and-shoulders
    ControlNet to keep the pose.
    """
    with quiet_import():
        from controlnet_aux.open_pose.body import Keypoint

    kps = np.asarray(face.kps, dtype=np.float32)
    left_eye, right_eye, nose = kps[0], kps[1], kps[2]  # image-left eye is the person's right eye
    eye_vec = right_eye - left_eye
    spacing = float(np.linalg.norm(eye_vec)) or max(face.width * 0.4, 1.0)
    across = eye_vec / spacing
    down = np.array([-across[1], across[0]], dtype=np.float32)
    neck = nose + down * face.height * 1.1
    shoulder = across * face.width * 1.4

    def kp(point: np.ndarray, idx: int):
        x, y = float(point[0]) / width, float(point[1]) / height
        return Keypoint(x=x, y=y, score=1.0, id=idx) if 0 <= x <= 1 and 0 <= y <= 1 else None

    points: list = [None] * 18
    points[0] = kp(nose, 0)
    points[1] = kp(neck, 1)
    points[2] = kp(neck - shoulder + down * face.height * 0.2, 2)  # person's right shoulder, image-left
    points[5] = kp(neck + shoulder + down * face.height * 0.2, 5)
    points[14] = kp(left_eye, 14)
    points[15] = kp(right_eye, 15)
    points[16] = kp(left_eye - across * spacing * 0.55, 16)
    points[17] = kp(right_eye + across * spacing * 0.55, 17)
    return points


def _face_points(face: FaceObservation, width: int, height: int) -> list:
    with quiet_import():
        from controlnet_aux.open_pose.body import Keypoint

    pts = face.landmarks if face.landmarks is not None else face.kps
    return [Keypoint(x=float(x) / width, y=float(y) / height) for x, y in np.asarray(pts, dtype=np.float32)]


def openpose_from_faces(faces: Sequence[FaceObservation], width: int, height: int,
                        source_size: tuple[int, int] | None = None) -> np.ndarray:
    """An OpenPose-style map (body + face dots) drawn from detected faces, no annotator weights."""
    with quiet_import():
        from controlnet_aux.open_pose import util

    src_w, src_h = source_size or (width, height)
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    for face in faces:
        body = _body_from_face(face, src_w, src_h)
        canvas = util.draw_bodypose(canvas, body)
        canvas = util.draw_facepose(canvas, _face_points(face, src_w, src_h))
    return canvas


def load_openpose_annotator(ctx):
    """controlnet-aux's OpenposeDetector from registry-resolved files (never the network)."""
    from portrait.core.models import load

    return load(ctx, "annotator-openpose", "openpose")


def load_depth_annotator(ctx):
    """controlnet-aux's MidasDetector from registry-resolved files (never the network)."""
    from portrait.core.models import load

    return load(ctx, "annotator-midas", "midas")


def _annotate(detector, image: np.ndarray, width: int, height: int, **kwargs) -> np.ndarray:
    res = max(64, min(1024, max(image.shape[:2])))
    out = detector(image, detect_resolution=res, image_resolution=res, output_type="np", **kwargs)
    return fit(np.asarray(out, dtype=np.uint8), width, height)


# --- one entry point -----------------------------------------------------------------------


def make_control(name: str, image: np.ndarray, width: int, height: int, strength: float, *, ctx=None,
                 faces: Sequence[FaceObservation] | None = None, preprocessed: bool = False,
                 pose_source: str = "auto", start: float = 0.0, end: float = 1.0) -> ControlImage:
    """Build one control map of `image` at (width, height).

    pose_source: "annotator" (controlnet-aux weights via the registry), "landmarks" (drawn
    from `faces`), or "auto" = landmarks under a tiny preset or when the caller already has
    faces and no annotator weights, annotator otherwise.
    """
    if preprocessed:
        return ControlImage(name, fit(image, width, height), strength, start, end, "shipped")
    if name == "canny":
        return ControlImage(name, canny(fit(image, width, height)), strength, start, end, "opencv")
    if name == "tile":
        return ControlImage(name, tile(fit(image, width, height)), strength, start, end, "opencv")
    if name == "color":
        return ControlImage(name, color_map(fit(image, width, height)), strength, start, end, "opencv")
    if name == "openpose":
        return _openpose(image, width, height, strength, ctx, faces, pose_source, start, end)
    if name == "depth":
        if ctx is None:
            raise BadInput("depth control: needs the MiDaS annotator (annotator-midas) or a shipped depth map")
        if ctx.preset.tiny:
            raise BadInput("depth control: no offline stand-in for annotator-midas; ship a depth map with the "
                           "template (`preprocessed: true`) or use a real preset")
        detector = load_depth_annotator(ctx)
        return ControlImage(name, _annotate(detector, image, width, height), strength, start, end, "annotator")
    raise BadInput(f"unknown control '{name}' (known: canny, openpose, depth, tile, color)")


def _openpose(image, width, height, strength, ctx, faces, pose_source, start, end) -> ControlImage:
    use_landmarks = pose_source == "landmarks" or (pose_source == "auto" and (ctx is None or ctx.preset.tiny))
    if use_landmarks:
        if faces is None:
            raise BadInput("openpose control: no faces were given to draw the pose from")
        # Draw at the source size, then fit exactly like the image, so the map stays aligned.
        h, w = image.shape[:2]
        drawn = openpose_from_faces(faces, w, h)
        return ControlImage("openpose", fit(drawn, width, height), strength, start, end, "landmarks")
    detector = load_openpose_annotator(ctx)
    out = _annotate(detector, image, width, height, include_body=True, include_face=True, include_hand=False)
    return ControlImage("openpose", out, strength, start, end, "annotator")
