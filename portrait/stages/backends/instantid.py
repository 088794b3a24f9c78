"""Backend `instantid` (SDXL): InstantID's Resampler + IP attention and its IdentityNet.

Zero-shot: the raw antelopev2 embedding of the identity's photos is projected to 16 face
tokens that go (a) into the UNet's IP-Adapter attention and (b) into the IdentityNet as its
`encoder_hidden_states`, with the face keypoints drawn as InstantID draws them. The
keypoints come from a pose reference: option `pose_image`, else the template's image, else
the identity's reference photo. Extra ControlNets (canny/depth/openpose) of the template
run alongside the IdentityNet, reading the text as usual. A trained SDXL identity LoRA, when
the bundle has one, is active too.

InstantID's `{image_proj, ip_adapter}` loads through diffusers' `load_ip_adapter` (diffusers
takes its Resampler as IP-Adapter-Plus, stages/zeroshot.attached_ip_adapter); the IdentityNet
(an SDXL ControlNet) must see the 16 face tokens instead of the text, which the stock
ControlNet pipeline cannot do, so for one call its forward is wrapped to swap
`encoder_hidden_states` (`identitynet_tokens`).

Options: ip_adapter_scale (0.8), controlnet_conditioning_scale (0.8, the IdentityNet),
pose_image, id_mode mean|best, id_photos, face_locator, face_pack.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from pydantic import Field

from portrait.core.backend import LCM, AdapterSpace, BackendSpec
from portrait.core.archs import ip_adapter as ip_arch
from portrait.core.context import RunContext
from portrait.core.errors import BadInput
from portrait.core.options import ASSET, CommonOptions, EmbedOptions
from portrait.core.types import Candidate, GenerationRequest, Identity
from portrait.stages import embed as emb
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
                                                                   "image, else the identity's reference photo)",
                                   json_schema_extra=ASSET)


@dataclass(frozen=True)
class InstantIDPolicy:
    ip_scale: float = 0.8  # InstantID's defaults for both scales
    identitynet_scale: float = 0.8

    @classmethod
    def from_options(cls, options: Any) -> "InstantIDPolicy":
        """From the instantid backend's typed options (ip_adapter_scale, controlnet_conditioning_scale)."""
        return cls(ip_scale=float(options.ip_adapter_scale),
                   identitynet_scale=float(options.controlnet_conditioning_scale))

# --- InstantID's internals ---------------------------------------------------------------------

# The face space InstantID's Resampler and IdentityNet were trained on: insightface antelopev2's
# glintr100, the raw `embedding` (not normalized) of the largest face (its reference code).
FACE_SPACE = AdapterSpace("instantid", "antelopev2", "glintr100.onnx", normalized=False)

# InstantID's `draw_kps` (shared with InfiniteYou, which draws the same map).
from portrait.stages.keypoints import KPS_COLORS, KPS_LIMB_DIM, KPS_LIMBS, KPS_RADIUS, KPS_STICK_WIDTH, draw_kps  # noqa: E402,F401


def fit_points(points: np.ndarray, source_size: tuple[int, int], width: int, height: int) -> np.ndarray:
    """Map points of a (w, h) image through controls.fit's center-crop-and-resize."""
    w, h = source_size
    target = width / height
    x0 = y0 = 0.0
    if w / h > target:
        new_w = round(h * target)
        x0, w = (w - new_w) // 2, new_w
    elif w / h < target:
        new_h = round(w / target)
        y0, h = (h - new_h) // 2, new_h
    scaled = (np.asarray(points, dtype=np.float64) - [x0, y0]) * [width / w, height / h]
    return scaled.astype(np.float32)


@dataclass(frozen=True)
class PoseReference:
    source: str
    image: np.ndarray  # RGB
    kps: np.ndarray  # (5, 2) in `image` pixels


def pose_reference(ctx, request: GenerationRequest, embed_policy: emb.EmbedPolicy,
                   pose_image: str | None = None) -> PoseReference:
    """Where the face should be: option pose_image, else the template's image, else its
    openpose image, else the identity's reference photo."""
    r = request.resolved
    candidates = [pose_image, r.template_image, r.control_images.get("openpose")]
    chosen = next((str(p) for p in candidates if p), None) or str(request.identity.reference)
    path = Path(chosen)
    if not path.is_file():
        raise BadInput(f"{path}: pose reference does not exist")
    image = emb.read_rgb(path)
    return PoseReference(str(path), image, emb.pose_keypoints(ctx, image, str(path), FACE_SPACE, embed_policy))


def keypoint_image(pose: PoseReference, width: int, height: int) -> np.ndarray:
    h, w = pose.image.shape[:2]
    return draw_kps(width, height, fit_points(pose.kps, (w, h), width, height))


@dataclass(frozen=True)
class InstantIDInputs:
    id_embeds: Any  # torch [2, 1, 1, 512]: cat(zeros, raw antelopev2 embedding)
    embedding: emb.IdEmbedding


def instantid_adapter(ctx) -> zs.AdapterFile:
    af = zs.load_adapter_file(ctx, ctx.preset.model("instantid_adapter"), "instantid")
    if ip_arch.adapter_kind(af.state) not in ("instantid", "ip-adapter-plus"):
        raise BadInput(f"{af.path}: is not an InstantID ip-adapter.bin (no 16-query Resampler)")
    return af


def instantid_inputs(ctx, identity: Identity, af: zs.AdapterFile, embed_policy: emb.EmbedPolicy) -> InstantIDInputs:
    import torch

    if embed_policy.mode == "all":
        raise BadInput("InstantID takes one face embedding: use id_mode=mean or best")
    found = emb.embed_identity(ctx, identity, FACE_SPACE, embed_policy)
    zs.check_embedding_fits(af, found.vectors)
    cond = torch.from_numpy(found.vectors[:1]).to(device=ctx.placement.device, dtype=ctx.placement.dtype)
    cond = cond[None, :, None, :]  # [1, 1 image, 1 token, 512]: the Resampler reads a sequence
    return InstantIDInputs(torch.cat([torch.zeros_like(cond), cond]), found)


def face_tokens(pipe, id_embeds) -> Any:
    """The 16 projected face tokens (uncond first), by the UNet's own projection module.

    The Resampler is `unet.encoder_hid_proj`, called here directly, so no offload hook fires:
    under model / group offload it would run wherever the UNet's weights sit (the CPU). It runs
    on the pipeline's execution device instead (portrait.core.offload.on_execution_device)."""
    import torch

    from portrait.core.offload import on_execution_device

    device = pipe._execution_device
    with on_execution_device(pipe.unet.encoder_hid_proj, device) as projection, torch.no_grad():
        dtype = next(projection.parameters()).dtype
        return projection([id_embeds.to(device=device, dtype=dtype)])[0].flatten(1, 2)  # [2, 16, D]


@contextlib.contextmanager
def identitynet_tokens(net, tokens) -> Iterator[None]:
    """Feed the IdentityNet the face tokens instead of the text for one pipeline call.

    The pipeline passes the text embeddings (batch 2B with CFG, B in guess mode); the
    tokens are matched to that batch: the conditional half alone, or repeated per image.
    """
    original = net.forward

    def forward(*args, **kwargs):
        text = kwargs.get("encoder_hidden_states")
        like = text if text is not None else tokens
        kwargs["encoder_hidden_states"] = match_batch(tokens, like.shape[0]).to(device=like.device, dtype=like.dtype)
        return original(*args, **kwargs)

    net.forward = forward
    try:
        yield
    finally:
        del net.forward


def match_batch(tokens, batch: int):
    """[2, n, D] (uncond, cond) -> [batch, n, D] laid out as the pipeline lays out its text."""
    import torch

    if batch == tokens.shape[0]:
        return tokens
    if batch % 2 == 0 and tokens.shape[0] == 2:
        half = batch // 2
        return torch.cat([tokens[:1].expand(half, -1, -1), tokens[1:].expand(half, -1, -1)])
    return tokens[-1:].expand(batch, -1, -1)


@contextlib.contextmanager
def attached_instantid(pipe, af: zs.AdapterFile, inputs: InstantIDInputs, policy: InstantIDPolicy,
                       identitynet) -> Iterator[dict[str, Any]]:
    """InstantID on a ControlNet pipeline whose first ControlNet is `identitynet`."""
    with zs.attached_ip_adapter(pipe, af):
        pipe.set_ip_adapter_scale(policy.ip_scale)
        tokens = face_tokens(pipe, inputs.id_embeds)
        with identitynet_tokens(identitynet, tokens):
            yield {"ip_adapter_image_embeds": [inputs.id_embeds.to(dtype=pipe.unet.dtype)]}


# --- the backend ------------------------------------------------------------------------------


class InstantIDBackend:
    def generate(self, request: GenerationRequest, ctx: RunContext) -> Iterator[Candidate]:
        started = time.perf_counter()
        options = SPEC.read(request)
        policy = InstantIDPolicy.from_options(options)
        embed_policy = embed_policy_of(options)
        af = instantid_adapter(ctx)
        inputs = instantid_inputs(ctx, request.identity, af, embed_policy)
        pose = pose_reference(ctx, request, embed_policy, options.pose_image)
        kps = ControlImage("identitynet", keypoint_image(pose, request.width, request.height),
                           policy.identitynet_scale, source=f"keypoints of {pose.source}")
        extra_controls = request_controls(ctx, request, find_faces=pack_face_finder(ctx, FACE_SPACE, embed_policy),
                                          fallback=(pose.image, pose.source))
        identitynet_id = ctx.preset.model("instantid_controlnet")
        pipe = load_sd_pipeline(ctx, "txt2img",
                                (identitynet_id, *controlnet_ids(ctx, [c.name for c in extra_controls])),
                                keep_adapter=True)
        identitynet = pipe.controlnet.nets[0] if hasattr(pipe.controlnet, "nets") else pipe.controlnet
        identity_lora = loras.identity_use(request.identity, "sdxl", request.lora_weight)
        fast = loras.fast_use(ctx, request.resolved)  # --fast: the LCM-LoRA, merged with the identity LoRA
        stack = [u for u in (identity_lora, fast) if u is not None]
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
        with attached_instantid(pipe, af, inputs, policy, identitynet) as extra:
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
    face_space=FACE_SPACE,
    fast={"lcm": LCM},
    controls=True,
)
