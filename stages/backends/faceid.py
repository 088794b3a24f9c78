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
from typing import Iterator

from pydantic import Field

from portrait.core.backend import BackendSpec
from portrait.core.bundle import load_identity
from portrait.core.context import RunContext
from portrait.core.options import CommonOptions, EmbedOptions, FaceIDAdapterOptions, GroupOptions, resolved
from portrait.core.types import Candidate, GenerationRequest
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


class FaceIDBackend:
    def generate(self, request: GenerationRequest, ctx: RunContext) -> Iterator[Candidate]:
        started = time.perf_counter()
        options = SPEC.read(request)
        others = [n for n in options.identities or () if n != request.identity.name]
        if others and "faceid_variant" not in options.model_fields_set:
            # regional: FaceID v1 unless the user asked otherwise (then parse_regions/inputs refuse Plus)
            options = options.model_copy(update={"faceid_variant": "faceid"})
        policy = zs.FaceIDPolicy.from_options(options)
        embed_policy = embed_policy_of(options)
        af = zs.faceid_adapter(ctx, policy)
        regional: dict = {}
        if others:
            people = [request.identity] + [load_identity(ctx.settings, n) for n in others]
            regions = zs.parse_regions(options.regions, len(people))
            inputs, _found = zs.regional_faceid_inputs(ctx, people, policy, af, embed_policy)
            mask = zs.region_masks(regions, request.width, request.height)
            regional = {"cross_attention_kwargs": {"ip_adapter_masks": [mask.to(ctx.placement.device)]}}
            faces = [{"identity": p.name, "face": k,
                      "box": [round(b[0] * request.width, 1), round(b[1] * request.height, 1),
                              round(b[2] * request.width, 1), round(b[3] * request.height, 1)]}
                     for k, (p, b) in enumerate(zip(people, regions))]
        else:
            inputs = zs.faceid_inputs(ctx, request.identity, policy, af, embed_policy)
        controls = self._controls(request, ctx, embed_policy)
        pipe = load_sd_pipeline(ctx, "txt2img", controlnet_ids(ctx, [c.name for c in controls]))
        identity_lora = loras.identity_use(request.identity, ctx.preset.family, request.lora_weight)
        stack = [identity_lora] if identity_lora else []
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

    def _controls(self, request: GenerationRequest, ctx: RunContext, embed_policy: emb.EmbedPolicy) -> list:
        if not request.controls:
            return []
        pose = resolved(request).template_image or str(request.identity.reference)
        image = emb.read_rgb(pose) if pose else None
        return request_controls(ctx, request, find_faces=pack_face_finder(ctx, embed_policy),
                                fallback=(image, str(pose)))


SPEC = BackendSpec(
    name="faceid",
    families=("sd15", "sdxl"),
    make=FaceIDBackend,
    help="IP-Adapter FaceID / Plus / PlusV2 (zero-shot; several identities in regions with --with-identity)",
    options=FaceIDOptions,
    models=_models,
    group=True,
)
