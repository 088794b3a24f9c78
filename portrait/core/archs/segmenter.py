"""The background segmenter (kind "segmenter"): a U^2-Net-style ONNX, one RGB input, a foreground
map first (portrait/stages/background.py whitens with it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..modelfiles import Kind, onnx_session

SIZE = 320  # U^2-Net's input side
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


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


def _build_segmenter(source) -> Segmenter:
    """A U2-Net-style ONNX (one RGB input, a foreground map first) on `onnx_providers(ctx)`."""
    session = onnx_session(source.verified(), source.ctx, "ONNX segmenter")
    return Segmenter(session, source.model_id, source.resolved.spec.license)


SEGMENTER = Kind("segmenter", _build_segmenter)
