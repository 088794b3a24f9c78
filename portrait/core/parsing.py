"""Face parsing through the model door: the registry's BiSeNet (portrait/core/archs/bisenet.py holds
the network, its labels and its builder), loaded once per run context."""

from __future__ import annotations

from .archs.bisenet import (CROP_SCALE, IMAGENET_MEAN, IMAGENET_STD, INPUT_SIZE, LABEL, LABELS,  # noqa: F401
                            FaceParser, bisenet, bisenet_from_state)
from .models import load


def load_face_parser(ctx, model_id: str) -> FaceParser:
    """The registry's parser (tiny stand-in offline), through the model door (kind "face-parser")."""
    return load(ctx, model_id, "face-parser")
