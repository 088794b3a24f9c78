"""CLIP models the door builds: IP-Adapter's vision encoder (kind "clip-vision") and the CLIP
model CLIP-T prompt scores use (kind "clip-score", portrait/stages/score.py). transformers'
classes; the files are read by `from_pretrained` from the resolved folder."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..modelfiles import ClipVision, Kind, Source


def _clip_vision(source: Source) -> ClipVision:
    """CLIPVisionModelWithProjection (IP-Adapter's ViT-H image encoder; `file="models/image_encoder"`)
    and a CLIPImageProcessor for its input size."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    model = CLIPVisionModelWithProjection.from_pretrained(source.folder, dtype=source.dtype)
    model = source.place(model).eval()
    size = int(model.config.image_size)
    return ClipVision(model, CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}))


@dataclass(frozen=True)
class ClipModel:
    model: Any  # transformers CLIPModel
    processor: Any  # transformers CLIPProcessor
    device: str


def _build_clip(source) -> ClipModel:
    """transformers CLIPModel + CLIPProcessor from a folder, for CLIP-T prompt scores."""
    from transformers import CLIPModel, CLIPProcessor

    folder = source.folder
    model = CLIPModel.from_pretrained(folder, torch_dtype=source.dtype if source.ctx.placement.is_cuda else None)
    return ClipModel(source.place(model).eval(), CLIPProcessor.from_pretrained(folder), source.device)


CLIP_VISION = Kind("clip-vision", _clip_vision)
CLIP_SCORE = Kind("clip-score", _build_clip)
