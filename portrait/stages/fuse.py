"""Face fusion: put the identity's reference face onto a target face (EasyPhoto's fusion step).

1. A 5-point similarity transform warps the reference onto the target face.
2. The warped reference is colour-matched to the target's skin in LAB (mean and spread per
   channel, Reinhard-style), so the pasted face has the target's light and tone.
3. An alpha mask decides what comes from the reference: eyes, brows, nose and mouth fully
   (they carry identity), the rest of the skin at `skin_ratio` (EasyPhoto uses 0.6, which
   keeps the target's shading and texture), nothing outside the face outline; optionally
   the target's own lips.
4. Blending is Poisson (OpenCV's seamlessClone, which makes the pasted gradients meet the
   target's boundary colours) or a plain feathered alpha; both go through the soft alpha, so
   there is no visible seam at the mask border.

The face regions come from 68-point landmarks when the face backend gives them, otherwise
from the 5 keypoints (portrait.core.facemask). Faces come in as observations: detection is
the caller's job, so one analyzer (cached) serves every stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, Mapping, Sequence

import numpy as np
from pydantic import Field

from portrait.core.declare import policy_from
from portrait.core.errors import BadInput, bad_file
from portrait.core.faces import similarity_transform
from portrait.core.facemask import PARSED_FACE, FaceRegions, face_regions, feather, parsed_mask, regions_from_points
from portrait.core.types import FaceObservation

MIN_FACE_PX = 16


@dataclass(frozen=True)
class FusePolicy:
    """Settings from the preset's `finish.fuse` section (a template may override them)."""

    SECTION: ClassVar[str] = "finish.fuse"

    method: Literal["blend", "inswapper"] = "blend"  # blend (landmark warp + masks) | inswapper (the optional ONNX swapper, non-commercial)
    skin_ratio: Annotated[float, Field(ge=0.0, le=1.0)] = 0.6  # share of the reference's skin in the result
    feature_ratio: Annotated[float, Field(ge=0.0, le=1.0)] = 1.0  # share of the reference's eyes, brows, nose and mouth
    keep_target_lips: bool = False  # keep the generated mouth instead of the reference's
    blend: Literal["poisson", "feather"] = "poisson"  # poisson (seamless clone) | feather (alpha blend)
    color_transfer: bool = True  # match the reference face's colours to the target's skin first
    feather: Annotated[float, Field(ge=0.0)] = 1 / 14  # alpha edge softness as a fraction of the face size

    @classmethod
    def from_section(cls, section: Mapping[str, Any], where: str = "preset finish.fuse") -> "FusePolicy":
        return policy_from(cls, section, where)


@dataclass(frozen=True)
class Fused:
    image: np.ndarray
    alpha: np.ndarray  # float32 HxW: the reference's share per pixel
    matrix: np.ndarray  # 2x3 reference -> target transform


def require_face(faces: Sequence[FaceObservation], source: str) -> FaceObservation:
    """The largest face, or a BadInput naming the image."""
    if not faces:
        raise bad_file(source, "no face found")
    face = max(faces, key=lambda f: f.area)
    _check_face(face, source)
    return face


def _check_face(face: FaceObservation, source: str) -> None:
    if min(face.width, face.height) < MIN_FACE_PX:
        raise bad_file(source, f"the face is {face.width:.0f}x{face.height:.0f} px; at least {MIN_FACE_PX} px is needed to fuse")


def fuse(reference: np.ndarray, reference_face: FaceObservation, target: np.ndarray, target_face: FaceObservation,
         policy: FusePolicy, reference_name: str = "reference", target_name: str = "target",
         target_parsing: np.ndarray | None = None) -> Fused:
    """The target image with the reference's face fused onto `target_face`.

    `target_parsing` (a face-parsing label map of the target) keeps the target's hair,
    glasses and ears out of the fused area.
    """
    import cv2

    _check(reference, reference_name)
    _check(target, target_name)
    _check_face(reference_face, reference_name)
    _check_face(target_face, target_name)
    h, w = target.shape[:2]
    matrix = similarity_transform(np.asarray(reference_face.kps), np.asarray(target_face.kps))
    warped = cv2.warpAffine(reference, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    valid = cv2.warpAffine(np.ones(reference.shape[:2], np.uint8), matrix, (w, h), flags=cv2.INTER_NEAREST)

    target_regions = face_regions(target.shape, target_face)
    source_regions = _warped_regions(target.shape, reference_face, matrix)
    area = (target_regions.face & source_regions.face & valid).astype(np.uint8)
    if target_parsing is not None:
        area &= parsed_mask(target_parsing, PARSED_FACE)
    if not area.any():
        raise bad_file(target_name, "the reference face does not overlap the target face after alignment")
    if policy.color_transfer:
        warped = lab_transfer(warped, source_regions.skin & area, target, target_regions.skin & area)
    alpha = fusion_alpha(area, source_regions, target_regions, policy)
    if policy.blend == "poisson":
        donor = poisson_clone(warped, target, area)
    else:
        donor = warped
    out = target.astype(np.float32) * (1.0 - alpha[..., None]) + donor.astype(np.float32) * alpha[..., None]
    return Fused(np.clip(np.rint(out), 0, 255).astype(np.uint8), alpha, matrix)


def _warped_regions(shape: tuple[int, ...], face: FaceObservation, matrix: np.ndarray) -> FaceRegions:
    def move(points: np.ndarray) -> np.ndarray:
        points = np.asarray(points, dtype=np.float64)
        return points @ matrix[:, :2].T + matrix[:, 2]

    landmarks = face.landmarks if face.landmarks is not None and len(face.landmarks) == 68 else None
    return regions_from_points(shape, move(face.kps), None if landmarks is None else move(landmarks))


def fusion_alpha(area: np.ndarray, source: FaceRegions, target: FaceRegions, policy: FusePolicy) -> np.ndarray:
    """Per-pixel share of the reference: features at feature_ratio, skin at skin_ratio, 0 outside."""
    size = min(source.size, target.size)
    edge = feather(area, size * policy.feather, inside=True)
    features = feather(source.features & area, size * policy.feather / 2, inside=False)
    alpha = edge * np.maximum(policy.skin_ratio, features * policy.feature_ratio)
    if policy.keep_target_lips:
        alpha *= 1.0 - feather(target.mouth, size * policy.feather / 3, inside=False)
    return alpha.astype(np.float32)


def lab_transfer(image: np.ndarray, image_mask: np.ndarray, reference: np.ndarray, reference_mask: np.ndarray) -> np.ndarray:
    """Shift `image`'s LAB mean and spread inside `image_mask` onto `reference`'s inside its mask.

    The spread ratio is bounded so a flat or tiny mask cannot blow the colours up.
    """
    import cv2

    if np.count_nonzero(image_mask) < 16 or np.count_nonzero(reference_mask) < 16:
        return image
    lab = cv2.cvtColor(image.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)
    ref = cv2.cvtColor(reference.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)
    src_px, ref_px = lab[image_mask > 0], ref[reference_mask > 0]
    mean_s, std_s = src_px.mean(0), src_px.std(0) + 1e-3
    mean_r, std_r = ref_px.mean(0), ref_px.std(0) + 1e-3
    ratio = np.clip(std_r / std_s, 0.5, 2.0)
    moved = (lab - mean_s) * ratio + mean_r
    moved[..., 0] = np.clip(moved[..., 0], 0, 100)
    rgb = cv2.cvtColor(moved.astype(np.float32), cv2.COLOR_LAB2RGB)
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


def poisson_clone(donor: np.ndarray, target: np.ndarray, area: np.ndarray) -> np.ndarray:
    """OpenCV's seamless clone of `donor` into `target` over `area` (same size, same place)."""
    import cv2

    mask = area.astype(np.uint8) * 255
    # seamlessClone needs the mask clear of the image border
    mask[:2, :] = 0
    mask[-2:, :] = 0
    mask[:, :2] = 0
    mask[:, -2:] = 0
    if np.count_nonzero(mask) < 16:
        return donor
    x, y, bw, bh = cv2.boundingRect(mask)
    centre = (x + bw // 2, y + bh // 2)
    cloned = cv2.seamlessClone(np.ascontiguousarray(donor[..., ::-1]), np.ascontiguousarray(target[..., ::-1]),
                               mask, centre, cv2.NORMAL_CLONE)
    return np.ascontiguousarray(cloned[..., ::-1])


def _check(image: np.ndarray, name: str) -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise bad_file(name, "not an HxWx3 uint8 RGB image")
    if min(image.shape[:2]) < MIN_FACE_PX:
        raise bad_file(name, f"image is {image.shape[1]}x{image.shape[0]}; too small to hold a face")


# --- the optional inswapper ---------------------------------------------------------------------


def load_swapper(ctx, model_id: str):
    """insightface's INSwapper for an inswapper-style ONNX from the registry, through the model
    door (kind "insightface": routed by its shapes, on `onnx_providers(ctx)`), cached.

    The model is optional and non-commercial (see `portrait models list`); the source face's
    embedding must come from the buffalo_l recognizer, the space it was trained with.
    """
    from insightface.model_zoo.inswapper import INSwapper

    from portrait.core.models import load, resolve

    model = load(ctx, model_id, "insightface")
    if not isinstance(model, INSwapper):
        raise bad_file(resolve(ctx, model_id).path, "is not an inswapper-style ONNX swapper (two inputs, 128x128 faces)")
    return model


def swap_face(swapper, target: np.ndarray, target_face: FaceObservation, source_embedding: np.ndarray,
              target_name: str = "target") -> np.ndarray:
    """The target with its face replaced by the swapper, driven by a buffalo_l source embedding."""
    from insightface.app.common import Face

    _check(target, target_name)
    _check_face(target_face, target_name)
    embedding = np.asarray(source_embedding, np.float32).ravel()
    if embedding.shape != (512,):
        raise BadInput(f"{target_name}: the swapper needs a 512-d buffalo_l embedding, got {embedding.size}-d")
    bgr = np.ascontiguousarray(target[..., ::-1])
    face = Face(bbox=np.asarray(target_face.box, np.float32), kps=np.asarray(target_face.kps, np.float32))
    swapped = swapper.get(bgr, face, Face(embedding=embedding), paste_back=True)
    return np.ascontiguousarray(swapped[..., ::-1])
