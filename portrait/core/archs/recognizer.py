"""An insightface pack's ArcFace ONNX (glintr100, w600k_r50) as a recognizer (kind "recognizer"),
fed insightface's own aligned crop: the identity adapters were trained on exactly those pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import BadInput
from ..modelfiles import Kind, insightface_model


class Recognizer:
    """One pack's ArcFace model, loaded by insightface's router from the pack folder."""

    def __init__(self, onnx_path: Path, device: str = "cpu"):
        self.model = insightface_model(onnx_path, device)
        if not hasattr(self.model, "get_feat"):
            raise BadInput(f"{onnx_path}: not an insightface recognition model")
        self.input_size = int(self.model.input_size[0])

    def embed(self, image: np.ndarray, kps: np.ndarray) -> np.ndarray:
        """Raw embedding of the face at `kps` in an RGB image (insightface's own recipe)."""
        bgr = np.ascontiguousarray(insightface_crop(image, kps, self.input_size)[:, :, ::-1])
        return np.asarray(self.model.get_feat(bgr), dtype=np.float32).ravel()


def insightface_crop(image: np.ndarray, kps: np.ndarray, size: int) -> np.ndarray:
    """insightface's own `norm_crop`: the adapters were trained on exactly these pixels."""
    import warnings

    from insightface.utils import face_align

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # its skimage call is deprecated, not wrong
        return face_align.norm_crop(image, landmark=np.asarray(kps, dtype=np.float32), image_size=size)


def _build_recognizer(source) -> Recognizer:
    """An insightface pack's ArcFace ONNX (glintr100, w600k_r50) as a Recognizer, on `onnx_providers(ctx)`."""
    return Recognizer(source.verified(), source.device)


RECOGNIZER = Kind("recognizer", _build_recognizer)
