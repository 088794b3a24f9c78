"""Backend `template` (EasyPhoto style): paint an identity into a photo template, two passes.

For each template face assigned to an identity (left to right, or explicitly):

1. crop a square around the face and scale it to the processing size;
2. fuse the identity's reference face in (stages/fuse.py);
3. pass 1: inpaint the face region (denoise ~0.45) with ControlNets canny + openpose +
   color (the tile ControlNet fed a colour mosaic), all made from the fused crop; the
   result is composited back through the soft face mask, so nothing outside it changes;
4. shift the new face's skin toward the template's skin in LAB (so face meets neck);
5. fuse again (the first pass drifts from the person);
6. pass 2: repaint a ring around the face edge (denoise ~0.3, tile + canny) to hide the seam;
7. paste the crop back into the full template through the union of both masks.

Other faces in the template are protected: their regions are cut out of every mask.
Option `passes` (default 2) stops after pass 1 (`1`) or runs fusion alone (`0`: steps 1, 2
and 7, no diffusion model loaded): a preview in about a second on a CPU, and the path whose
likeness can be measured offline, since the tiny stand-ins paint noise in the passes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import numpy as np

from pydantic import Field

from portrait.core.backend import FUSION_ONLY, LCM, AdapterSpace, BackendSpec
from portrait.core.context import RunContext
from portrait.core.errors import BadInput
from portrait.core.facemask import face_regions, feather
from portrait.core.options import CommonOptions, EmbedOptions, FaceIDAdapterOptions, GroupOptions, Pass2
from portrait.core.types import Candidate, FaceObservation, GenerationRequest, Identity
from portrait.stages import controls as ctl
from portrait.stages import fuse as fusion
from portrait.stages import loras
from portrait.stages import zeroshot as zs
from portrait.stages.sd import (
    call_pipeline,
    control_kwargs,
    controlnet_ids,
    load_sd_pipeline,
    model_info,
    prepare_pipeline,
)
from portrait.stages.seeding import candidate_seeds, with_seed


class TemplateOptions(CommonOptions, GroupOptions, FaceIDAdapterOptions, EmbedOptions):
    """A photo template's options (EasyPhoto's defaults, declared here once: the backend reads
    the request's typed copy of this model); with `identity_adapter: faceid` the FaceID
    adapter's and embedding options apply to the inpainting passes too."""

    identity_adapter: Literal["faceid"] | None = Field(None, description="add IP-Adapter FaceID to the passes")
    passes: Literal[0, 1, 2] = Field(2, description="2 face + ring, 1 face only, 0 fusion only (preview)")
    denoise: float = Field(0.45, ge=0.0, le=1.0, description="pass 1 strength")
    crop_scale: float = Field(2.0, gt=0.0, le=10.0, description="the face box grown by this much is repainted")
    mask_grow: float = Field(0.10, ge=0.0, le=2.0, description="face mask dilation, a fraction of the face size")
    color_transfer: bool = Field(True, description="LAB shift of the face skin toward the template's skin")
    fuse_ratio: float = Field(0.6, ge=0.0, le=1.0, description="skin mixing when the reference face is fused in")
    pass2: Pass2 = Field(default_factory=Pass2, description="the ring pass (2)")
    assign: Literal["left_to_right"] | list[int] = Field(
        "left_to_right", description="or a list of face indexes (left to right), one per identity")
    crop_size: int | None = Field(None, ge=8, le=4096, description="processing size of the face crop; default: the "
                                                                   "longer output side")


def _models(options: TemplateOptions) -> tuple[str, ...]:
    if options.identity_adapter == "faceid":
        return ("face_pack_faceid", "faceid" if options.faceid_variant == "faceid" else "faceid_plus")
    return ()


# Pass 1's ControlNets when the template names none (EasyPhoto's): canny and openpose from the
# fused crop, and the tile ControlNet fed a colour mosaic of it.
PASS1_CONTROLS = {"canny": 0.5, "openpose": 0.5, "color": 0.85}


@dataclass(frozen=True)
class FacePaint:
    """What one face went through, in crop coordinates (tests and debugging read these)."""

    identity: str
    face_index: int
    box: tuple[int, int, int, int]  # the crop in output-image pixels (x0, y0, x1, y1)
    crop: np.ndarray  # the template crop at processing size
    fused: np.ndarray
    pass1_mask: np.ndarray  # uint8 {0,1}: what pass 1 may change
    pass1: np.ndarray  # after pass 1, composited through the pass-1 mask
    pass2_mask: np.ndarray  # uint8 {0,1}: the ring
    pass2: np.ndarray
    steps: tuple[int, int]  # effective steps of pass 1 and pass 2


class TemplateBackend:
    def generate(self, request: GenerationRequest, ctx: RunContext) -> Iterator[Candidate]:
        for seed in candidate_seeds(request):
            t0 = time.perf_counter()
            image, paints, info = self.render(request, ctx, seed)
            yield Candidate(image=image, seed=seed, request=with_seed(request, seed, request.n),
                            timings={"generate": time.perf_counter() - t0}, info=info)

    def render(self, request: GenerationRequest, ctx: RunContext, seed: int) -> tuple[np.ndarray, list[FacePaint], dict]:
        """The finished template image for one seed, with each face's intermediate steps."""
        options: TemplateOptions = request.options  # typed and checked once, at resolution
        r = request.resolved
        if not r.template_image:
            raise BadInput(f"the template backend needs a photo template (got {request.template or 'a prompt'})")
        template_path = Path(r.template_image)
        canvas = ctl.fit(ctl.read_rgb(template_path), request.width, request.height)
        analyzer = _analyzer(ctx, request)
        faces = template_faces(analyzer, template_path, request, canvas.shape)
        people = _identities(ctx, request, options)
        pairs = assign_faces(faces, people, options.assign, request.template or str(template_path))
        fuse_policy = _fuse_policy(ctx, options)
        paints = []
        used_loras: list[loras.AdapterUse] = []
        sampled = options.passes > 0  # passes=0 loads no pipeline: no model, LoRA or sampler shaped the image
        # A style LoRA (merged: inpainting a face keeps both active) and the fast mode's LoRA apply to every face.
        shared = [u for u in (loras.style_use(ctx, r.style_lora), loras.fast_use(ctx, r)) if u] if sampled else []
        for person, index in pairs:
            use = loras.identity_use(person, ctx.preset.family, request.lora_weight) if sampled else None
            stack = ([use] if use is not None else []) + shared
            used_loras += [use] if use is not None else []
            reference, reference_face = _reference(analyzer, person)
            others = [f for k, f in enumerate(faces) if k != index]
            canvas, paint = paint_face(ctx, request, options, fuse_policy, canvas, faces[index], index, others,
                                       reference, reference_face, person.name, stack, seed, person=person)
            paints.append(paint)
        adapter = options.identity_adapter
        modes = (["lora"] if used_loras else []) + ([adapter] if adapter else [])
        controls = pass1_controls(request)
        info = {
            "identity_mode": "+".join(modes) if modes and sampled else FUSION_ONLY,
            "model": model_info(ctx) if sampled else None,
            "loras": [u.as_info() for u in used_loras + shared],
            # `box`: the painted face in output pixels; finishing fuses and scores each face by it
            "faces": [{"identity": p.identity, "face": p.face_index, "crop": list(p.box),
                       "box": [round(float(v), 1) for v in faces[p.face_index].box]} for p in paints],
            "template_faces": len(faces),
            "unassigned_faces": [k for k in range(len(faces)) if k not in {i for _, i in pairs}],
            "passes": {"count": options.passes, "denoise": [options.denoise, options.pass2.denoise][:options.passes],
                       "steps": [list(p.steps[:options.passes]) for p in paints],
                       "controls": [controls, dict(options.pass2.controls)][:options.passes]},
        }
        if not sampled:
            info["note"] = "passes=0: the reference face fused into the template, no diffusion"
            # what made the image: each person's reference face, fused into the template photo
            info["fusion"] = {"source": [f"{p.name}/{p.reference.name}" for p, _ in pairs],
                              "target": request.template or str(template_path)}
        elif not used_loras:
            info["note"] = (f"no {ctx.preset.family} LoRA in the bundle: the face comes from "
                            + (f"fusion and {adapter}" if adapter else "fusion alone"))
        return canvas, paints, info


def pass1_controls(request: GenerationRequest) -> dict[str, float]:
    """Pass 1's ControlNets: the template's (and `--control`'s), else EasyPhoto's."""
    return dict(request.controls) if request.controls else dict(PASS1_CONTROLS)


# --- faces and identities --------------------------------------------------------------------


def _analyzer(ctx: RunContext, request: GenerationRequest):
    from portrait.core.faces import make_analyzer

    return make_analyzer(ctx, request.resolved.face_backend)


def scale_face(face: FaceObservation, sx: float, sy: float, dx: float = 0.0, dy: float = 0.0) -> FaceObservation:
    """The same face after the image was shifted by (-dx, -dy) and scaled by (sx, sy)."""
    scale = np.array([sx, sy], dtype=np.float32)
    shift = np.array([dx, dy], dtype=np.float32)
    x1, y1, x2, y2 = face.box
    return replace(
        face,
        box=((x1 - dx) * sx, (y1 - dy) * sy, (x2 - dx) * sx, (y2 - dy) * sy),
        kps=((np.asarray(face.kps, np.float32) - shift) * scale).astype(np.float32),
        landmarks=None if face.landmarks is None else ((np.asarray(face.landmarks, np.float32) - shift) * scale),
    )


def template_faces(analyzer, template_path: Path, request: GenerationRequest,
                   shape: tuple[int, ...]) -> list[FaceObservation]:
    """The template's faces, left to right, in output-image pixels.

    Detected on the full-resolution template (a face at output size may be too small for
    the detector), then mapped through the same crop-and-resize as the canvas.
    """
    original = ctl.read_rgb(template_path)
    found = analyzer.detect(original, embed=False)
    name = request.template or str(template_path)
    if not found:
        raise BadInput(f"template {name}: no face found in {template_path}")
    expected = request.resolved.template_faces
    if expected and len(found) < int(expected):
        raise BadInput(f"template {name}: {len(found)} face(s) found in {template_path}, the template says {expected}")
    h, w = original.shape[:2]
    out_h, out_w = shape[:2]
    # ctl.fit center-crops to the output aspect, then resizes: mirror that on the points.
    target = out_w / out_h
    crop_w, crop_h = (h * target, h) if w / h > target else (w, w / target)
    dx, dy = (w - crop_w) / 2, (h - crop_h) / 2
    faces = [scale_face(f, out_w / crop_w, out_h / crop_h, dx, dy) for f in found]
    return sorted(faces, key=lambda f: (f.box[0] + f.box[2]) / 2)


def _identities(ctx: RunContext, request: GenerationRequest, options: TemplateOptions) -> list[Identity]:
    """The request's identity, then its people in the order given (loaded by the flow)."""
    return [request.identity, *(p for p in request.people if p.name != request.identity.name)]


def assign_faces(faces: Sequence[FaceObservation], people: Sequence[Identity], assign: Any,
                 template: str) -> list[tuple[Identity, int]]:
    """Identity -> face index (faces are sorted left to right)."""
    if len(faces) < len(people):
        raise BadInput(f"template {template}: it has {len(faces)} face(s) but {len(people)} identities were given")
    if assign in (None, "left_to_right"):
        return [(p, k) for k, p in enumerate(people)]
    try:
        indexes = [int(i) for i in assign]
    except (TypeError, ValueError):
        raise BadInput(f"template {template}: assign must be 'left_to_right' or a list of face indexes") from None
    if len(indexes) != len(people) or len(set(indexes)) != len(indexes) or \
            any(not 0 <= i < len(faces) for i in indexes):
        raise BadInput(f"template {template}: assign {indexes} must name {len(people)} different faces "
                       f"between 0 and {len(faces) - 1}")
    return list(zip(people, indexes))


def _reference(analyzer, identity: Identity) -> tuple[np.ndarray, FaceObservation]:
    if not identity.reference.is_file():
        raise BadInput(f"{identity.reference}: identity '{identity.name}' has no reference face image")
    image = ctl.read_rgb(identity.reference)
    return image, fusion.require_face(analyzer.detect(image, embed=False), str(identity.reference))


def _fuse_policy(ctx: RunContext, options: TemplateOptions) -> fusion.FusePolicy:
    section = dict(ctx.preset.section("finish").get("fuse") or {})
    section["skin_ratio"] = options.fuse_ratio
    return fusion.FusePolicy.from_section(section)


# --- one face ----------------------------------------------------------------------------------


def crop_box(face: FaceObservation, shape: tuple[int, ...], scale: float) -> tuple[int, int, int, int]:
    """A square around the face, `scale` x its size, shifted (not cut) to stay inside the image."""
    h, w = shape[:2]
    cx, cy = (face.box[0] + face.box[2]) / 2, (face.box[1] + face.box[3]) / 2
    side = int(round(min(max(face.width, face.height) * scale, w, h)))
    x0 = int(round(min(max(cx - side / 2, 0), w - side)))
    y0 = int(round(min(max(cy - side / 2, 0), h - side)))
    return x0, y0, x0 + side, y0 + side


def _resize(image: np.ndarray, size: int | tuple[int, int], nearest: bool = False) -> np.ndarray:
    import cv2

    wh = (size, size) if isinstance(size, int) else size
    interp = cv2.INTER_NEAREST if nearest else (cv2.INTER_AREA if image.shape[1] > wh[0] else cv2.INTER_CUBIC)
    return cv2.resize(image, wh, interpolation=interp)


def _grow(mask: np.ndarray, radius: float) -> np.ndarray:
    import cv2

    r = int(round(radius))
    if r <= 0:
        return mask.astype(np.uint8)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    return cv2.dilate(mask.astype(np.uint8), kernel)


def _shrink(mask: np.ndarray, radius: float) -> np.ndarray:
    import cv2

    r = int(round(radius))
    if r <= 0:
        return mask.astype(np.uint8)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    return cv2.erode(mask.astype(np.uint8), kernel)


def composite(base: np.ndarray, painted: np.ndarray, soft: np.ndarray) -> np.ndarray:
    """base where soft == 0 (exactly), painted where soft == 1."""
    out = base.astype(np.float32) * (1.0 - soft[..., None]) + painted.astype(np.float32) * soft[..., None]
    mixed = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return np.where(soft[..., None] > 0, mixed, base)


def _steps(request_steps: int, denoise: float) -> int:
    """img2img runs int(steps * strength) steps; keep at least one."""
    return max(request_steps, math.ceil(1.0 / max(denoise, 1e-3)))


def _pil_mask(mask: np.ndarray):
    from PIL import Image

    return Image.fromarray((mask > 0).astype(np.uint8) * 255, mode="L")


def _inpaint(ctx, request, image, mask, denoise, controls: list[ctl.ControlImage], stack, seed,
             person: Identity | None = None) -> tuple[np.ndarray, int]:
    """One inpainting pass. With `identity_adapter: faceid` in the template options (and the
    person known) the pass also carries IP-Adapter FaceID, its LoRA active beside `stack`."""
    from PIL import Image

    faceid = person is not None and request.options.identity_adapter == "faceid"
    pipe = load_sd_pipeline(ctx, "inpaint", controlnet_ids(ctx, [c.name for c in controls]), keep_adapter=faceid)
    loras.attach(pipe, stack)
    prepare_pipeline(pipe, request, ctx)
    size = image.shape[0]
    steps = _steps(request.steps, denoise)

    def run(**extra):
        return call_pipeline(pipe, replace(request, steps=steps), seed, image=Image.fromarray(image),
                             mask_image=_pil_mask(mask), strength=float(denoise), width=size, height=size,
                             **control_kwargs(controls, key="control_image"), **extra)

    if faceid:
        with zs.faceid_for_request(ctx, pipe, request, person, [(u.adapter, u.weight) for u in stack]) as use:
            return run(**use.kwargs), steps
    with loras.composed(pipe, stack, "merge"):
        return run(), steps


def paint_face(ctx: RunContext, request: GenerationRequest, options: TemplateOptions, fuse_policy,
               canvas: np.ndarray, face: FaceObservation, index: int, others: Sequence[FaceObservation],
               reference: np.ndarray, reference_face: FaceObservation, who: str,
               stack: Sequence[loras.AdapterUse], seed: int, person: Identity | None = None
               ) -> tuple[np.ndarray, FacePaint]:
    """Both passes on one face; returns the new canvas and what happened."""
    x0, y0, x1, y1 = crop_box(face, canvas.shape, options.crop_scale)
    side = x1 - x0
    size = options.crop_size or _round8(max(request.width, request.height))
    s = size / side
    crop = _resize(canvas[y0:y1, x0:x1], size)
    local = scale_face(face, s, s, x0, y0)
    regions = face_regions(crop.shape, local)
    protect = np.zeros(crop.shape[:2], np.uint8)
    for other in others:
        protect |= _grow(face_regions(crop.shape, scale_face(other, s, s, x0, y0)).face, regions.size * 0.05)

    fused = fusion.fuse(reference, reference_face, crop, local, fuse_policy, "reference", "template").image
    mask1 = _grow(regions.face, regions.size * options.mask_grow) & (1 - protect)
    soft1 = feather(mask1, regions.size * 0.04, inside=True)
    if options.passes == 0:  # fusion only: no pipeline is loaded, so it runs without a base model
        only = composite(crop, fused, soft1)
        none = np.zeros_like(mask1)
        out = _paste(canvas, (x0, y0, x1, y1), only, mask1, size)
        return out, FacePaint(who, index, (x0, y0, x1, y1), crop, fused, mask1, only, none, only, (0, 0))
    controls1 = _controls(ctx, pass1_controls(request), fused, local)
    painted, steps1 = _inpaint(ctx, request, fused, mask1, options.denoise, controls1, stack, seed, person)
    pass1 = composite(crop, painted, soft1)

    recolored = pass1
    if options.color_transfer:
        skin = (regions.skin & mask1).astype(np.uint8)
        shifted = fusion.lab_transfer(pass1, skin, crop, regions.skin)
        recolored = composite(pass1, shifted, feather(skin, regions.size * 0.04, inside=True))
    refused = fusion.fuse(reference, reference_face, recolored, local, fuse_policy, "reference", "pass 1").image
    before_ring = composite(recolored, refused, soft1)

    width = max(1.0, regions.size * options.pass2.ring)
    ring = (_grow(mask1, width) & (1 - _shrink(mask1, width)) & (1 - protect)).astype(np.uint8)
    if options.passes == 1:
        ring = np.zeros_like(mask1)
        pass2, steps2 = before_ring, 0
    else:
        pass2_controls = _controls(ctx, options.pass2.controls, before_ring, local)
        painted2, steps2 = _inpaint(ctx, request, before_ring, ring, options.pass2.denoise, pass2_controls, stack,
                                    seed, person)
        pass2 = composite(before_ring, painted2, feather(ring, width * 0.3, inside=True))

    out = _paste(canvas, (x0, y0, x1, y1), pass2, (mask1 | ring).astype(np.uint8), size)
    return out, FacePaint(who, index, (x0, y0, x1, y1), crop, fused, mask1, pass1, ring, pass2, (steps1, steps2))


def _paste(canvas: np.ndarray, box: tuple[int, int, int, int], crop: np.ndarray, changed: np.ndarray,
           size: int) -> np.ndarray:
    """The processed crop back into the canvas, through the (feathered) union of what changed."""
    x0, y0, x1, y1 = box
    side = x1 - x0
    back = _resize(crop, (side, side))
    soft_back = feather(_resize(changed, (side, side), nearest=True), max(1.0, side / size), inside=True)
    out = canvas.copy()
    out[y0:y1, x0:x1] = composite(canvas[y0:y1, x0:x1], back, soft_back)
    return out


def _round8(value: float) -> int:
    return max(64, int(round(value / 8)) * 8)


def _controls(ctx: RunContext, strengths: dict[str, float], image: np.ndarray,
              face: FaceObservation) -> list[ctl.ControlImage]:
    h, w = image.shape[:2]
    return [ctl.make_control(name, image, w, h, float(strength), ctx=ctx, faces=[face])
            for name, strength in strengths.items() if strength > 0]


def _face_space(options: TemplateOptions) -> AdapterSpace | None:
    """With FaceID in its passes (`identity_adapter: faceid`) FaceID's space shapes the face too;
    else the LoRA does (the space that picked its checkpoints)."""
    return zs.faceid_space(options) if options.identity_adapter == "faceid" else None


SPEC = BackendSpec(
    name="template",
    families=("sd15", "sdxl"),
    make=TemplateBackend,
    help="paint the identity into a photo template, two inpainting passes (EasyPhoto style; group templates)",
    options=TemplateOptions,
    models=_models,
    needs_lora=True,
    group=True,
    photo_template=True,
    finish={"fuse": False},  # it fuses inside its own passes
    face_space=_face_space,
    fast={"lcm": LCM},  # the LCM-LoRA beside the identity LoRA in both inpainting passes
    controls=True,
    style_lora=True,  # a template's style LoRA, beside the identity LoRA in both passes
)
