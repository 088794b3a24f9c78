"""Super-resolution and face restoration through spandrel (Real-ESRGAN, GFPGAN).

spandrel recognizes a checkpoint by its keys and hands back a uniform descriptor (scale,
size requirements, half support), so nothing here branches on the upscaler's architecture;
basicsr/realesrgan/gfpgan are not used (they fail to import on current torchvision).

Like Real-ESRGAN's `RealESRGANer`, one function owns tiling, padding and precision: the
image is cut into tiles, each run with `overlap` pixels of context on every side, and only
each tile's interior is kept, so the stitched result matches an untiled run while memory
stays bounded by the tile size. The output is blended with a plain resize (EasyPhoto
blends 50%) because GAN upscalers can over-sharpen skin.

Face restorers (GFPGAN; CodeFormer is not in the registry: spandrel's core cannot load
it) work on 512 px aligned faces: each face is warped to the FFHQ template by its 5 keypoints, restored, and pasted back with a feathered mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, ClassVar, Sequence

import numpy as np
from pydantic import Field

from portrait.core.errors import BadInput, ModelMissing, bad_file
from portrait.core.types import FaceObservation

# The 5-point FFHQ template at 512 px that GFPGAN and CodeFormer were trained on
# (facexlib's face_template), in insightface keypoint order.
FFHQ_TEMPLATE_512 = np.array(
    [[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935],
     [201.26117, 371.41043], [313.08905, 371.15118]],
    dtype=np.float64,
)
RESTORE_SIZE = 512
MIN_SIDE = 4
# Restorers whose networks take and return images in [-1, 1] (spandrel's descriptor call
# assumes [0, 1] and would clamp their output).
SIGNED_RANGE_ARCHES = ("GFPGAN", "RestoreFormer", "CodeFormer")


@dataclass(frozen=True)
class UpscalePolicy:
    """Settings from the preset's `finish.upscale` section."""

    SECTION: ClassVar[str] = "finish.upscale"

    outscale: Annotated[float, Field(gt=0.0)] = 2.0  # final scale; the model's native scale is resized to it
    blend: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5  # weight of the SR result against a plain Lanczos resize
    tile: Annotated[int, Field(ge=0)] = 256  # input tile side in px (0 = whole image in one pass)
    overlap: Annotated[int, Field(ge=0)] = 16  # context px on each side of a tile
    max_output_pixels: Annotated[int, Field(ge=1)] = 80_000_000  # refuse outputs larger than this (memory)
    restore_weight: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5  # face restoration blend with the upscaled face


@dataclass(frozen=True)
class Upscaled:
    image: np.ndarray
    scale: float  # output size / input size
    model_scale: int
    tiles: int


# --- loading ------------------------------------------------------------------------------


def load_model(ctx, model_id: str):
    """A spandrel descriptor for a registry id, through the model door (kind "spandrel"), in eval mode."""
    from portrait.core.models import load

    return load(ctx, model_id, "spandrel")


def try_load_restorer(ctx, model_id: str):
    """The face restorer, or None when it cannot run here (with the reason).

    Restorers have no tiny stand-in (spandrel's GFPGAN is fixed at its full 512 px size), so
    under a tiny preset, or with the weights absent, restoration is skipped and reported.
    """
    import spandrel

    try:
        return load_model(ctx, model_id), ""
    except (ModelMissing, BadInput) as exc:  # absent, or "has no tiny stand-in"
        return None, str(exc)
    except spandrel.UnsupportedModelError as exc:
        return None, f"model '{model_id}': spandrel cannot load it ({exc})"


# --- super-resolution ---------------------------------------------------------------------


def check_upscalable(image: np.ndarray, scale: float, policy: UpscalePolicy, source: str = "image") -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise bad_file(source, "not an HxWx3 uint8 RGB image")
    h, w = image.shape[:2]
    if min(h, w) < MIN_SIDE:
        raise bad_file(source, f"image is {w}x{h}; at least {MIN_SIDE}x{MIN_SIDE} px is needed to upscale")
    out_pixels = round(w * scale) * round(h * scale)
    if out_pixels > policy.max_output_pixels:
        raise bad_file(source, f"{w}x{h} upscaled x{scale:g} would be {out_pixels / 1e6:.0f} MP, above the "
                               f"{policy.max_output_pixels / 1e6:.0f} MP limit (finish.upscale.max_output_pixels); "
                               "lower the scale")


def upscale(image: np.ndarray, model, policy: UpscalePolicy, outscale: float | None = None,
            source: str = "image") -> Upscaled:
    """Upscale an RGB uint8 image by `outscale` (default the policy's) with a spandrel model."""
    import cv2

    outscale = float(outscale or policy.outscale)
    check_upscalable(image, outscale, policy, source)
    h, w = image.shape[:2]
    sr, tiles = run_tiled(image, model, policy.tile, policy.overlap)
    size = (max(1, round(w * outscale)), max(1, round(h * outscale)))
    if sr.shape[1] != size[0] or sr.shape[0] != size[1]:
        shrinking = size[0] < sr.shape[1]
        sr = cv2.resize(sr, size, interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LANCZOS4)
    if policy.blend < 1.0:
        plain = cv2.resize(image, size, interpolation=cv2.INTER_LANCZOS4)
        sr = _mix(plain, sr, policy.blend)
    return Upscaled(sr, outscale, int(model.scale), tiles)


def _mix(a: np.ndarray, b: np.ndarray, weight_b: float | np.ndarray, rows: int = 512) -> np.ndarray:
    """a x (1 - w) + b x w in uint8, a band of rows at a time (float copies of a whole
    80 MP output would need gigabytes)."""
    out = np.empty_like(a)
    for y in range(0, a.shape[0], rows):
        band = slice(y, y + rows)
        w = weight_b[band] if isinstance(weight_b, np.ndarray) else weight_b
        mixed = a[band].astype(np.float32) * (1.0 - w) + b[band].astype(np.float32) * w
        out[band] = np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
    return out


def tile_grid(length: int, tile: int) -> list[tuple[int, int]]:
    """[start, end) spans covering `length` in steps of `tile` (one span when tile is 0)."""
    if tile <= 0 or tile >= length:
        return [(0, length)]
    return [(start, min(start + tile, length)) for start in range(0, length, tile)]


def run_tiled(image: np.ndarray, model, tile: int, overlap: int) -> tuple[np.ndarray, int]:
    """The model's output for the whole image, computed tile by tile.

    Each tile is cut with `overlap` px of real context around it (less at the borders),
    run, and only the part that maps to the tile's interior is written to the output.
    """
    import torch

    h, w = image.shape[:2]
    scale = int(model.scale)
    out = np.empty((h * scale, w * scale, 3), dtype=np.uint8)
    device, dtype = _model_device_dtype(model)
    rows, cols = tile_grid(h, tile), tile_grid(w, tile)
    with torch.inference_mode():
        for y0, y1 in rows:
            for x0, x1 in cols:
                cy0, cy1 = max(0, y0 - overlap), min(h, y1 + overlap)
                cx0, cx1 = max(0, x0 - overlap), min(w, x1 + overlap)
                result = _run_patch(model, image[cy0:cy1, cx0:cx1], device, dtype)
                ty, tx = (y0 - cy0) * scale, (x0 - cx0) * scale
                out[y0 * scale : y1 * scale, x0 * scale : x1 * scale] = result[ty : ty + (y1 - y0) * scale,
                                                                               tx : tx + (x1 - x0) * scale]
    return out, len(rows) * len(cols)


def _run_patch(model, patch: np.ndarray, device, dtype) -> np.ndarray:
    import torch

    tensor = torch.from_numpy(patch.copy()).permute(2, 0, 1)[None].to(device=device, dtype=dtype) / 255.0
    return model(tensor)[0].float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()


def _model_device_dtype(model):
    param = next(model.model.parameters())
    return param.device, param.dtype


# --- face restoration -----------------------------------------------------------------------


def restore_faces(image: np.ndarray, faces: Sequence[FaceObservation], model, weight: float = 0.5) -> np.ndarray:
    """Restore each face at 512 px and paste it back, blended with `weight` (0 = untouched)."""
    import cv2

    if int(model.scale) != 1:
        raise BadInput(f"face restorer {model.architecture.id} has scale {model.scale}; a restorer must keep the size")
    out = image.copy()
    for face in faces:
        matrix = _ffhq_matrix(face.kps)
        crop = cv2.warpAffine(out, matrix, (RESTORE_SIZE, RESTORE_SIZE), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_REFLECT_101)
        restored = _run_restorer(model, crop)
        inverse = cv2.invertAffineTransform(matrix)
        h, w = out.shape[:2]
        pasted = cv2.warpAffine(restored, inverse, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        mask = cv2.warpAffine(_paste_mask(), inverse, (w, h), flags=cv2.INTER_LINEAR)[..., None]
        out = _mix(out, pasted, mask * weight)
    return out


def _ffhq_matrix(kps: np.ndarray) -> np.ndarray:
    from skimage.transform import SimilarityTransform

    src = np.asarray(kps, dtype=np.float64)
    if hasattr(SimilarityTransform, "from_estimate"):
        tform = SimilarityTransform.from_estimate(src, FFHQ_TEMPLATE_512)
    else:
        tform = SimilarityTransform()
        tform.estimate(src, FFHQ_TEMPLATE_512)
    return np.asarray(tform.params[:2], dtype=np.float64)


def _paste_mask() -> np.ndarray:
    """A square mask with a soft border (GFPGAN's paste uses an eroded, blurred square too)."""
    import cv2

    margin = RESTORE_SIZE // 16
    mask = np.zeros((RESTORE_SIZE, RESTORE_SIZE), np.float32)
    mask[margin:-margin, margin:-margin] = 1.0
    return cv2.GaussianBlur(mask, (0, 0), margin / 2)


def _run_restorer(model, crop: np.ndarray) -> np.ndarray:
    import torch

    device, dtype = _model_device_dtype(model)
    tensor = torch.from_numpy(crop.copy()).permute(2, 0, 1)[None].to(device=device, dtype=dtype) / 255.0
    with torch.inference_mode():
        if model.architecture.id in SIGNED_RANGE_ARCHES:
            raw = model.model(tensor * 2.0 - 1.0)
            result = ((raw[0] if isinstance(raw, (tuple, list)) else raw) + 1.0) / 2.0
        else:
            result = model(tensor)
    return result[0].float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()


def native_scale_needed(outscale: float) -> int:
    """The smallest Real-ESRGAN scale (2 or 4) that reaches `outscale` without upsizing after."""
    return 2 if outscale <= 2 else 4 if outscale <= 4 else int(2 ** math.ceil(math.log2(outscale)))
