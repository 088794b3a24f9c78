"""Backend `instantid` (SDXL): InstantID's Resampler + IP attention and its IdentityNet.

Zero-shot: the raw antelopev2 embedding of the identity's photos is projected to 16 face
tokens that go (a) into the UNet's IP-Adapter attention and (b) into the IdentityNet as its
`encoder_hidden_states`, with the face keypoints drawn as InstantID draws them. The
keypoints come from a pose reference: option `pose_image`, else the template's image, else
the identity's reference photo. Extra ControlNets (canny/depth/openpose) of the template
run alongside the IdentityNet, reading the text as usual. A trained SDXL identity LoRA, when
the bundle has one, is active too.

Options: ip_adapter_scale (0.8), controlnet_conditioning_scale (0.8, the IdentityNet),
pose_image, id_mode mean|best, id_photos, face_locator, face_pack.
"""

from __future__ import annotations

import time
from typing import Iterator

from pydantic import Field

from portrait.core.backend import BackendSpec
from portrait.core.context import RunContext
from portrait.core.options import CommonOptions, EmbedOptions
from portrait.core.types import Candidate, GenerationRequest
from portrait.stages import loras
from portrait.stages import zeroshot as zs
from portrait.stages.controls import ControlImage
from portrait.stages.identity_inputs import embed_policy_of, pack_face_finder, request_controls
from portrait.stages.sd import call_pipeline, control_kwargs, controlnet_ids, load_sd_pipeline, model_info, \
    prepare_pipeline
from portrait.stages.seeding import seeded_candidates


class InstantIDOptions(CommonOptions, EmbedOptions):
    """InstantID's options (defaults as in InstantID's reference code)."""

    ip_adapter_scale: float = Field(0.8, ge=0.0, le=5.0, description="IP-Adapter scale of the face tokens")
    controlnet_conditioning_scale: float = Field(0.8, ge=0.0, le=5.0, description="IdentityNet scale")
    pose_image: str | None = Field(None, min_length=1, description="pose reference image (default: the template's "
                                                                   "image, else the identity's reference photo)")


class InstantIDBackend:
    def generate(self, request: GenerationRequest, ctx: RunContext) -> Iterator[Candidate]:
        started = time.perf_counter()
        options = SPEC.read(request)
        policy = zs.InstantIDPolicy.from_options(options)
        embed_policy = embed_policy_of(options)
        af = zs.instantid_adapter(ctx)
        inputs = zs.instantid_inputs(ctx, request.identity, af, embed_policy)
        pose = zs.pose_reference(ctx, request, embed_policy, options.pose_image)
        kps = ControlImage("identitynet", zs.keypoint_image(pose, request.width, request.height),
                           policy.identitynet_scale, source=f"keypoints of {pose.source}")
        extra_controls = request_controls(ctx, request, find_faces=pack_face_finder(ctx, embed_policy),
                                          fallback=(pose.image, pose.source))
        identitynet_id = ctx.preset.model("instantid_controlnet")
        pipe = load_sd_pipeline(ctx, "txt2img",
                                (identitynet_id, *controlnet_ids(ctx, [c.name for c in extra_controls])))
        identitynet = pipe.controlnet.nets[0] if hasattr(pipe.controlnet, "nets") else pipe.controlnet
        identity_lora = loras.identity_use(request.identity, "sdxl", request.lora_weight)
        stack = [identity_lora] if identity_lora else []
        loras.attach(pipe, stack)
        prepare_pipeline(pipe, request, ctx)
        controls = [kps, *extra_controls]
        info = {
            "identity_mode": "zero-shot+lora" if identity_lora else "zero-shot",
            "adapter": {"id": af.model_id, "identitynet": identitynet_id, "ip_adapter_scale": policy.ip_scale,
                        "controlnet_conditioning_scale": policy.identitynet_scale},
            "embedding": inputs.embedding.info(),
            "pose_reference": pose.source,
            "model": model_info(ctx),
            "loras": [u.as_info() for u in stack],
            "controls": {c.name: {"strength": c.strength, "source": c.source} for c in controls},
        }
        if identity_lora is None:
            info["note"] = "no sdxl LoRA in the bundle: ran zero-shot"
        setup = time.perf_counter() - started
        with zs.attached_instantid(pipe, af, inputs, policy, identitynet) as extra:
            with loras.composed(pipe, stack, "merge"):
                yield from seeded_candidates(
                    request, lambda seed: call_pipeline(pipe, request, seed, **control_kwargs(controls), **extra),
                    setup_seconds=setup, info=info)


SPEC = BackendSpec(
    name="instantid",
    families=("sdxl",),
    make=InstantIDBackend,
    help="InstantID: face tokens + IdentityNet keypoints (SDXL, zero-shot)",
    options=InstantIDOptions,
    models=("instantid_controlnet", "instantid_adapter", "face_pack_instantid"),
)
