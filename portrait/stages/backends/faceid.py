"""Backend `faceid`: IP-Adapter FaceID / FaceID-Plus / FaceID-PlusV2 (SD1.5 and SDXL).

Zero-shot: the identity comes from buffalo_l embeddings of the bundle's top-k photos (and,
for Plus, CLIP ViT-H on their 224 aligned face crops), fed through diffusers' native
IP-Adapter path. Works with the identity's trained LoRA of the same family (both active,
next to the FaceID LoRA) and with ControlNets from the template or the reference photo.

Options (template `options:` or `--option`): faceid_variant faceid|plusv2|plus,
ip_adapter_scale (0.6), s_scale (1.0, PlusV2 shortcut), faceid_lora_scale (1.0),
faceid_model (a file), id_mode mean|all|best, id_photos, face_locator, face_pack.

Several people in one picture (`--with-identity`, option `identities`): each identity's
embedding is one IP-Adapter image, confined to its own region with diffusers' IP-Adapter
masks (`cross_attention_kwargs={"ip_adapter_masks": ...}`), so identities do not bleed
into each other. Regions: option `regions` (one [x0, y0, x1, y1] box per identity, fractions
of the image; default equal vertical strips, left to right). The picture is then finished
and scored face by face (each region's face against its own identity). FaceID (v1) only:
the Plus variants feed one set of CLIP face crops per call.
"""

from __future__ import annotations

import time
from typing import Any, Iterator, Sequence

import numpy as np

from pydantic import Field

from portrait.core.backend import LCM, AdapterSpace, BackendSpec
from portrait.core.context import RunContext
from portrait.core.errors import BadInput
from portrait.core.options import CommonOptions, EmbedOptions, FaceIDAdapterOptions, GroupOptions
from portrait.core.types import Candidate, GenerationRequest, Identity
from portrait.stages import embed as emb
from portrait.stages import loras
from portrait.stages import zeroshot as zs
from portrait.stages.identity_inputs import embed_policy_of, pack_face_finder, request_controls
from portrait.stages.sd import call_pipeline, control_kwargs, controlnet_ids, load_sd_pipeline, model_info, \
    prepare_pipeline
from portrait.stages.seeding import seeded_candidates


class FaceIDOptions(CommonOptions, FaceIDAdapterOptions, EmbedOptions, GroupOptions):
    """IP-Adapter FaceID's options (defaults as in h94's examples)."""

    regions: list[list[float]] | None = Field(None, description="with identities: one [x0, y0, x1, y1] box "
                                                                "(fractions of the image) per identity")


def _models(options: FaceIDOptions) -> tuple[str, ...]:
    variant = options.faceid_variant if "faceid_variant" in options.model_fields_set or not options.identities \
        else "faceid"  # the regional path runs FaceID v1 unless asked otherwise
    return ("face_pack_faceid", zs.FACEID_ROLES[variant])


# --- regional identities (several people in one text-to-image picture) ------------------------------


def default_regions(count: int) -> list[tuple[float, float, float, float]]:
    """Equal vertical strips, left to right, as fractions (x0, y0, x1, y1) of the image."""
    return [(k / count, 0.0, (k + 1) / count, 1.0) for k in range(count)]


def parse_regions(value: Any, count: int) -> list[tuple[float, float, float, float]]:
    """Option `regions`: one [x0, y0, x1, y1] box (fractions of the image) per identity."""
    if value is None:
        return default_regions(count)
    try:
        boxes = [tuple(float(v) for v in box) for box in value]
    except (TypeError, ValueError):
        raise BadInput("option regions: expected a list of [x0, y0, x1, y1] boxes (fractions of the image)") from None
    if len(boxes) != count or any(len(b) != 4 or not (0 <= b[0] < b[2] <= 1 and 0 <= b[1] < b[3] <= 1)
                                  for b in boxes):
        raise BadInput(f"option regions: {count} boxes [x0, y0, x1, y1] with 0 <= x0 < x1 <= 1 and "
                       f"0 <= y0 < y1 <= 1 are needed, one per identity")
    return boxes  # type: ignore[return-value]


def region_masks(regions: Sequence[tuple[float, float, float, float]], width: int, height: int):
    """diffusers' IP-Adapter masks for one adapter and several images: [1, n, height, width]."""
    from diffusers.image_processor import IPAdapterMaskProcessor
    from PIL import Image

    masks = []
    for x0, y0, x1, y1 in regions:
        mask = np.zeros((height, width), np.uint8)
        mask[int(round(y0 * height)):int(round(y1 * height)), int(round(x0 * width)):int(round(x1 * width))] = 255
        masks.append(Image.fromarray(mask, mode="L"))
    processed = IPAdapterMaskProcessor().preprocess(masks, height=height, width=width)  # [n, 1, H, W]
    return processed.reshape(1, processed.shape[0], processed.shape[2], processed.shape[3])


def regional_faceid_inputs(ctx, people: Sequence[Identity], policy: zs.FaceIDPolicy, af: zs.AdapterFile,
                           embed_policy: emb.EmbedPolicy) -> tuple[zs.FaceIDInputs, list[emb.IdEmbedding]]:
    """One FaceID embedding per person (the mean of their photos', unit length), as diffusers'
    several images of one IP-Adapter: id_embeds [2, n_people, d], to be masked per region."""
    import torch

    if policy.plus:
        raise BadInput("regional identities (option identities) need faceid_variant=faceid: the Plus variants "
                       "carry one CLIP face crop set per call")
    found = [emb.embed_identity(ctx, person, policy.space, embed_policy) for person in people]
    vectors = []
    for f in found:
        zs.check_embedding_fits(af, f.vectors)
        mean = np.asarray(f.vectors, np.float32).mean(axis=0)
        vectors.append(mean / max(float(np.linalg.norm(mean)), 1e-8) * float(np.linalg.norm(f.vectors[0])))
    cond = torch.from_numpy(np.stack(vectors)).to(device=ctx.placement.device, dtype=ctx.placement.dtype)[None]
    return zs.FaceIDInputs(torch.cat([torch.zeros_like(cond), cond]), None, found[0]), found


class FaceIDBackend:
    def generate(self, request: GenerationRequest, ctx: RunContext) -> Iterator[Candidate]:
        started = time.perf_counter()
        options = SPEC.read(request)
        others = [p for p in request.people if p.name != request.identity.name]
        if others and "faceid_variant" not in options.model_fields_set:
            # regional: FaceID v1 unless the user asked otherwise (then parse_regions/inputs refuse Plus)
            options = options.model_copy(update={"faceid_variant": "faceid"})
        policy = zs.FaceIDPolicy.from_options(options)
        embed_policy = embed_policy_of(options)
        af = zs.faceid_adapter(ctx, policy)
        regional: dict = {}
        if others:
            people = [request.identity, *others]
            regions = parse_regions(options.regions, len(people))
            inputs, _found = regional_faceid_inputs(ctx, people, policy, af, embed_policy)
            mask = region_masks(regions, request.width, request.height)
            regional = {"cross_attention_kwargs": {"ip_adapter_masks": [mask.to(ctx.placement.device)]}}
            faces = [{"identity": p.name, "face": k,
                      "box": [round(b[0] * request.width, 1), round(b[1] * request.height, 1),
                              round(b[2] * request.width, 1), round(b[3] * request.height, 1)]}
                     for k, (p, b) in enumerate(zip(people, regions))]
        else:
            inputs = zs.faceid_inputs(ctx, request.identity, policy, af, embed_policy)
        controls = self._controls(request, ctx, policy.space, embed_policy)
        pipe = load_sd_pipeline(ctx, "txt2img", controlnet_ids(ctx, [c.name for c in controls]), keep_adapter=True)
        identity_lora = loras.identity_use(request.identity, ctx.preset.family, request.lora_weight)
        fast = loras.fast_use(ctx, request.resolved)  # --fast: the LCM-LoRA, active beside the FaceID LoRA
        stack = [u for u in (identity_lora, fast) if u is not None]
        loras.attach(pipe, stack)
        prepare_pipeline(pipe, request, ctx)
        info = {
            "identity_mode": "zero-shot+lora" if identity_lora else "zero-shot",
            "adapter": {"id": af.model_id, "variant": policy.variant, "scale": policy.scale,
                        "s_scale": policy.s_scale if policy.variant == "plusv2" else None,
                        "lora_scale": policy.lora_scale},
            "embedding": inputs.info(),
            "model": model_info(ctx),
            "loras": [u.as_info() for u in stack],
            "controls": {c.name: {"strength": c.strength, "source": c.source} for c in controls},
        }
        if others:  # finishing fuses and scores the face found in each region against its identity
            info["faces"] = faces
            info["regions"] = [list(b) for b in regions]
        if identity_lora is None:
            info["note"] = f"no {ctx.preset.family} LoRA in the bundle: ran zero-shot"
        setup = time.perf_counter() - started
        with zs.attached_faceid(pipe, af, inputs, policy) as extra:
            try:

                def render(seed: int):
                    zs.activate_with_faceid(pipe, [(u.adapter, u.weight) for u in stack], policy)
                    return call_pipeline(pipe, request, seed, **control_kwargs(controls), **extra, **regional)

                yield from seeded_candidates(request, render, setup_seconds=setup, info=info)
            finally:
                if stack:
                    pipe.disable_lora()

    def _controls(self, request: GenerationRequest, ctx: RunContext, space: AdapterSpace,
                  embed_policy: emb.EmbedPolicy) -> list:
        if not request.controls:
            return []
        pose = request.resolved.template_image or str(request.identity.reference)
        image = emb.read_rgb(pose) if pose else None
        return request_controls(ctx, request, find_faces=pack_face_finder(ctx, space, embed_policy),
                                fallback=(image, str(pose)))


SPEC = BackendSpec(
    name="faceid",
    families=("sd15", "sdxl"),
    make=FaceIDBackend,
    help="IP-Adapter FaceID / Plus / PlusV2 (zero-shot; several identities in regions with --with-identity)",
    options=FaceIDOptions,
    models=_models,
    group=True,
    face_space=zs.faceid_space,  # IP-Adapter FaceID embeds with buffalo_l
    fast={"lcm": LCM},
    controls=True,
)
