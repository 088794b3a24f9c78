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
from typing import ClassVar, Iterator

from portrait.core.context import RunContext
from portrait.core.types import Candidate, GenerationRequest
from portrait.stages import embed as emb
from portrait.stages import loras
from portrait.stages import zeroshot as zs
from portrait.stages.controls import ControlImage
from portrait.stages.generate import seeded_candidates
from portrait.stages.sd import call_pipeline, control_kwargs, controlnet_ids, load_sd_pipeline, model_info, \
    prepare_pipeline


class InstantIDBackend:
    name: ClassVar[str] = "instantid"
    families: ClassVar[tuple[str, ...]] = ("sdxl",)

    def generate(self, request: GenerationRequest, ctx: RunContext) -> Iterator[Candidate]:
        started = time.perf_counter()
        policy = zs.InstantIDPolicy.from_options(request.options)
        embed_policy = emb.EmbedPolicy.from_options(request.options)
        af = zs.instantid_adapter(ctx)
        inputs = zs.instantid_inputs(ctx, request.identity, af, embed_policy)
        pose = zs.pose_reference(ctx, request, embed_policy)
        kps = ControlImage("identitynet", zs.keypoint_image(pose, request.width, request.height),
                           policy.identitynet_scale, source=f"keypoints of {pose.source}")
        extra_controls = zs.zero_shot_controls(ctx, request, pose.image, pose.source, embed_policy)
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
