"""What several backends feed a pipeline besides the prompt: ControlNet maps from a request's
controls, and the typed embedding settings. A neutral home, so no backend imports another.

`request_controls` is the one control-building loop (the lora, faceid and instantid backends
used to write it twice): each control of the request is made from the image its template
ships, else from a fallback image the backend chooses (a zero-shot backend's pose reference),
else it is refused naming the template. Faces for an openpose map drawn from landmarks (the
tiny preset's annotator) come from the backend's own face finder, as before.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from portrait.core.backend import AdapterSpace
from portrait.core.context import RunContext
from portrait.core.errors import BadInput
from portrait.core.options import EmbedOptions
from portrait.core.types import GenerationRequest
from portrait.stages import embed as emb

# (image, where it came from) -> the faces an openpose map is drawn from
FaceFinder = Callable[[np.ndarray, str], list]


def embed_policy_of(options: EmbedOptions, mode: str | None = None) -> emb.EmbedPolicy:
    """The embedding policy from a backend's typed options (`mode` overrides id_mode)."""
    return emb.EmbedPolicy(mode=mode or options.id_mode, max_photos=options.id_photos, locator=options.face_locator,
                           pack=options.face_pack)


def request_controls(ctx: RunContext, request: GenerationRequest, *, find_faces: FaceFinder | None,
                     fallback: tuple[np.ndarray, str] | None = None, skip: Sequence[str] = ()) -> list:
    """ControlImages of the request's controls, at generation size, in the request's order."""
    from portrait.stages import controls as ctl

    r = request.resolved
    preprocessed = set(r.control_preprocessed)
    made = []
    for name, strength in request.controls.items():
        if name in skip:
            continue
        if name in r.control_images:
            source, where = ctl.read_rgb(Path(r.control_images[name])), r.control_images[name]
        elif fallback is not None and fallback[0] is not None:
            source, where = fallback
        else:
            raise BadInput(f"template {request.template}: control '{name}' has no image to read it from")
        faces = None
        if name == "openpose" and name not in preprocessed and ctx.preset.tiny and find_faces is not None:
            faces = find_faces(source, where)  # the real annotator finds the pose itself
        start, end = r.control_range.get(name, (0.0, 1.0))
        made.append(ctl.make_control(name, source, request.width, request.height, float(strength), ctx=ctx,
                                     faces=faces, preprocessed=name in preprocessed, start=start, end=end))
    return made


def pack_face_finder(ctx: RunContext, space: AdapterSpace, embed_policy: emb.EmbedPolicy) -> FaceFinder:
    """Zero-shot backends: the largest face by the locator of the backend's own face space (its
    pack's keypoints; the tiny preset's dlib), so a backend needs no other pack than its own."""

    def find(image: np.ndarray, where: str) -> list:
        face = emb.largest_face(emb.make_locator(ctx, space, embed_policy), image)
        if face is None:
            raise BadInput(f"{where}: no face found for the openpose control")
        return [face]

    return find


def analyzer_face_finder(ctx: RunContext, request: GenerationRequest) -> FaceFinder:
    """LoRA backends: every face the preset's face analyzer finds in the pose image."""

    def find(image: np.ndarray, where: str) -> list:
        from portrait.core.faces import make_analyzer

        faces = make_analyzer(ctx, request.resolved.face_backend).detect(image, embed=False)
        if not faces:
            raise BadInput(f"template {request.template}: no face found in its pose image")
        return faces

    return find
