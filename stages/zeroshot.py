"""What the zero-shot identity backends share: IP-Adapter FaceID and InstantID plumbing.

The backends (stages/backends/faceid.py, instantid.py) and the `template` backend's
inpainting passes use these functions on any diffusers pipeline of the preset's base, so
the adapters live here and no backend imports another.

Pipelines come from portrait.core.loaders and share their UNet with every other pipeline
of the base (and with other backends in a batch run). An adapter is therefore attached
for one request and detached when it ends (`attached_faceid`, `attached_instantid`); its
state dict is read once and kept in ctx.cache, so re-attaching costs no disk read.

- FaceID / FaceID-Plus / PlusV2 go through diffusers' own `load_ip_adapter` (their LoRA
  becomes the PEFT adapter `faceid_0`, as diffusers does it) and `ip_adapter_image_embeds`
  = [cat(zeros, id)]; Plus sets the CLIP hidden states (and V2 the shortcut) on diffusers'
  projection module, the documented way.
- InstantID's `{image_proj, ip_adapter}` also loads through `load_ip_adapter` (diffusers
  takes its Resampler as IP-Adapter-Plus); the IdentityNet (an SDXL ControlNet) must see
  the 16 face tokens instead of the text, which the stock ControlNet pipeline cannot do, so
  for one call its forward is wrapped to swap `encoder_hidden_states` (`identitynet_tokens`).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping, Sequence

import numpy as np

from pydantic import BaseModel, ValidationError

from portrait.core.cache import CacheKey
from portrait.core.declare import describe
from portrait.core.errors import BadInput
from portrait.core.options import EmbedOptions, FaceIDAdapterOptions, resolved
from portrait.core.types import GenerationRequest, Identity
from portrait.stages import embed as emb

FaceIDVariant = Literal["faceid", "plusv2", "plus"]
FACEID_ROLES = {"faceid": "faceid", "plusv2": "faceid_plus", "plus": "faceid_plus_v1"}
FACEID_LORA_ADAPTER = "faceid_0"  # the name diffusers gives the first IP-Adapter's LoRA


# --- policies (template / request options) -----------------------------------------------------


@dataclass(frozen=True)
class FaceIDPolicy:
    variant: FaceIDVariant = "plusv2"
    scale: float = 0.6  # ip_adapter_scale (h94's examples)
    s_scale: float = 1.0  # PlusV2 shortcut weight
    lora_scale: float = 1.0  # the FaceID LoRA's weight (1.0 as diffusers loads it; A1111 users often 0.6-0.7)
    model: str | None = None  # registry id or file overriding the preset's role

    @classmethod
    def from_options(cls, options: FaceIDAdapterOptions | Mapping[str, Any]) -> "FaceIDPolicy":
        """From a backend's typed options (or a request's options mapping, read through the
        FaceID adapter's declaration)."""
        if not isinstance(options, FaceIDAdapterOptions):
            options = _typed(FaceIDAdapterOptions, options)
        return cls(variant=options.faceid_variant, scale=options.ip_adapter_scale, s_scale=options.s_scale,
                   lora_scale=options.faceid_lora_scale, model=options.faceid_model)

    @property
    def plus(self) -> bool:
        return self.variant in ("plus", "plusv2")


@dataclass(frozen=True)
class InstantIDPolicy:
    ip_scale: float = 0.8  # InstantID's defaults for both scales
    identitynet_scale: float = 0.8

    @classmethod
    def from_options(cls, options: Any) -> "InstantIDPolicy":
        """From the instantid backend's typed options (ip_adapter_scale, controlnet_conditioning_scale)."""
        return cls(ip_scale=float(options.ip_adapter_scale), identitynet_scale=float(options.controlnet_conditioning_scale))


def _typed(model: type[BaseModel], options: Mapping[str, Any]) -> Any:
    """The keys of `options` that `model` declares, validated (a bad value is one BadInput line)."""
    try:
        return model.model_validate({k: v for k, v in options.items() if k in model.model_fields})
    except ValidationError as exc:
        raise BadInput(f"option {describe(exc)}") from None


# --- adapter files -------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterFile:
    model_id: str
    path: Path
    state: dict  # {"image_proj": ..., "ip_adapter": ...}


def load_adapter_file(ctx, model_id_or_path: str, name: str | None = None) -> AdapterFile:
    """An IP-Adapter-style `.bin` (registry id or explicit file), read once per process."""
    from portrait.core.loaders import load_torch_file

    path = Path(str(model_id_or_path)).expanduser()
    explicit = path.suffix in (".bin", ".safetensors") or "/" in str(model_id_or_path)
    if explicit:
        if not path.is_file():
            raise BadInput(f"{path}: adapter file does not exist")
        resolved = ctx.registry.resolve("instantid-adapter" if name == "instantid" else "ip-adapter-faceid-sd15",
                                        ctx.settings, tiny=ctx.preset.tiny, explicit=path)
        file_name = path.name
    else:
        resolved = ctx.resolve(model_id_or_path)
        file_name = next((f for f in resolved.files if f.endswith(".bin")), resolved.files[0])
    key = CacheKey(f"state:{resolved.root / file_name}", "cpu", "state")
    state = ctx.cache.get(key, lambda: load_torch_file(ctx, resolved, file_name))
    if not isinstance(state, dict) or not {"image_proj", "ip_adapter"} <= set(state):
        raise BadInput(f"{resolved.root / file_name}: not an IP-Adapter checkpoint (needs image_proj and ip_adapter)")
    return AdapterFile(resolved.spec.id, resolved.root / file_name, state)


def adapter_kind(state: dict) -> str:
    """What an IP-Adapter-style checkpoint is, from its keys (as diffusers' loader tells them apart)."""
    proj = state["image_proj"]
    if "perceiver_resampler.proj_in.weight" in proj:
        return "faceid-plus"
    if "norm.weight" in proj and "proj.0.weight" in proj:
        return "faceid"
    if "latents" in proj:
        return "instantid" if proj["latents"].shape[1] == 16 and proj["proj_in.weight"].shape[1] == 512 \
            else "ip-adapter-plus"
    return "ip-adapter"


def check_adapter(af: AdapterFile, want: str) -> None:
    kind = adapter_kind(af.state)
    if kind != want:
        raise BadInput(f"{af.path}: is an {kind} checkpoint, not {want}")


def id_input_dim(af: AdapterFile) -> int:
    proj = af.state["image_proj"]
    weight = proj.get("proj.0.weight", proj.get("proj_in.weight"))
    return int(weight.shape[1])


def check_embedding_fits(af: AdapterFile, vectors: np.ndarray) -> None:
    want = id_input_dim(af)
    if vectors.shape[-1] != want:
        raise BadInput(f"{af.path}: takes {want}-d face embeddings, the pack gave {vectors.shape[-1]}-d "
                       f"(wrong face pack for this adapter)")


def processor_numbering(unet) -> dict[str, int]:
    """Processor name -> the index IP-Adapter checkpoints use (`unet.attn_processors` order).

    Once an adapter is attached, its Resampler's own attention shows up in attn_processors
    under `encoder_hid_proj.`; the checkpoints number the UNet's processors only.
    """
    names = [n for n in unet.attn_processors if not n.startswith("encoder_hid_proj.")]
    return {name: i for i, name in enumerate(names)}


@contextlib.contextmanager
def quiet(logger_name: str) -> Iterator[None]:
    import logging

    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def attached_ip_adapter(pipe, af: AdapterFile) -> Iterator[None]:
    """Attach an IP-Adapter checkpoint for the duration of a block, then restore the UNet."""
    peft = getattr(pipe.unet, "peft_config", {}) or {}
    if FACEID_LORA_ADAPTER in peft:
        # diffusers names every first IP-Adapter LoRA `faceid_0` and skips loading when the
        # name exists: a stale one (another FaceID variant) must go first.
        pipe.delete_adapters([FACEID_LORA_ADAPTER])
    with quiet("diffusers.loaders.ip_adapter"):  # "image_encoder is not loaded": we pass embeddings
        pipe.load_ip_adapter(af.state, subfolder=None, weight_name=None, image_encoder_folder=None)
    try:
        yield
    finally:
        pipe.unload_ip_adapter()
        if FACEID_LORA_ADAPTER in (getattr(pipe.unet, "peft_config", {}) or {}):
            pipe.delete_adapters([FACEID_LORA_ADAPTER])


# --- FaceID ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FaceIDInputs:
    """The call arguments of a FaceID pipeline call, ready for any diffusers SD/SDXL pipeline."""

    id_embeds: Any  # torch [2, k, d]: cat(zeros, id)
    clip_embeds: Any | None  # torch [2, k, seq, hidden] for Plus: cat(uncond, cond)
    embedding: emb.IdEmbedding

    def info(self) -> dict[str, Any]:
        return self.embedding.info()


def faceid_adapter(ctx, policy: FaceIDPolicy) -> AdapterFile:
    af = load_adapter_file(ctx, policy.model or ctx.preset.model(FACEID_ROLES[policy.variant]), "faceid")
    check_adapter(af, "faceid-plus" if policy.plus else "faceid")
    return af


def load_clip_vision(ctx):
    """CLIP ViT-H (h94/IP-Adapter models/image_encoder) and its 224 px processor, cached."""

    def build():
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        resolved = ctx.resolve_role("clip_vision")
        folder = resolved.file("models/image_encoder")
        model = CLIPVisionModelWithProjection.from_pretrained(folder, dtype=ctx.placement.dtype)
        model = model.to(ctx.placement.device).eval()
        size = int(model.config.image_size)
        return model, CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})

    model_id = ctx.preset.model("clip_vision")
    return ctx.cache.get(CacheKey(model_id, ctx.placement.device, ctx.placement.dtype_name, ("clip-vision",)), build)


def faceid_inputs(ctx, identity: Identity, policy: FaceIDPolicy, af: AdapterFile,
                  embed_policy: emb.EmbedPolicy) -> FaceIDInputs:
    """buffalo_l normed embeddings (+ CLIP ViT-H of the 224 face crops for Plus) of the identity."""
    import torch

    adapter = "faceid_plus" if policy.plus else "faceid"
    found = emb.embed_identity(ctx, identity, adapter, embed_policy)
    check_embedding_fits(af, found.vectors)
    dtype, device = ctx.placement.dtype, ctx.placement.device
    cond = torch.from_numpy(found.vectors).to(device=device, dtype=dtype)[None]  # [1, k, d]
    id_embeds = torch.cat([torch.zeros_like(cond), cond])  # IP-Adapter's uncond: zeros
    clip_embeds = None
    if policy.plus:
        encoder, processor = load_clip_vision(ctx)
        faces = emb.clip_face_crops(found.crops)
        cond_clip, uncond_clip = emb.clip_hidden_states(encoder, processor, faces, found.mode, device, dtype)
        clip_embeds = torch.cat([uncond_clip, cond_clip])
    return FaceIDInputs(id_embeds, clip_embeds, found)


@contextlib.contextmanager
def attached_faceid(pipe, af: AdapterFile, inputs: FaceIDInputs, policy: FaceIDPolicy) -> Iterator[dict[str, Any]]:
    """FaceID on `pipe` for one block; yields the pipeline kwargs (`ip_adapter_image_embeds`).

    The FaceID LoRA is active at `policy.lora_scale` alongside whatever LoRAs the caller
    activates afterwards: call `activate_with_faceid` after setting the caller's adapters.
    """
    with attached_ip_adapter(pipe, af):
        pipe.set_ip_adapter_scale(policy.scale)
        if inputs.clip_embeds is not None:
            projection = pipe.unet.encoder_hid_proj.image_projection_layers[0]
            projection.clip_embeds = inputs.clip_embeds.to(dtype=pipe.unet.dtype)
            projection.shortcut = policy.variant == "plusv2"
            projection.shortcut_scale = policy.s_scale
        yield {"ip_adapter_image_embeds": [inputs.id_embeds.to(dtype=pipe.unet.dtype)]}


@dataclass(frozen=True)
class AdapterUse:
    """An attached identity adapter: the pipeline kwargs to pass, and what to record."""

    kwargs: dict[str, Any]
    info: dict[str, Any]


@contextlib.contextmanager
def faceid_for_request(ctx, pipe, request: GenerationRequest, identity: Identity,
                       others: Sequence[tuple[str, float]] = ()) -> Iterator[AdapterUse]:
    """FaceID for one request on any SD/SDXL pipeline of the preset's family (txt2img,
    img2img, inpaint, with ControlNets), e.g. the template backend's inpainting passes:
    reads the request's options, attaches the adapter, activates its LoRA next to `others`
    (adapter name, weight) and yields the call kwargs; everything is undone on exit.

        with zs.faceid_for_request(ctx, pipe, request, person, [(use.adapter, use.weight)]) as faceid:
            image = call_pipeline(pipe, request, seed, **faceid.kwargs, ...)
    """
    policy = FaceIDPolicy.from_options(request.options)
    embed = _typed(EmbedOptions, request.options)
    af = faceid_adapter(ctx, policy)
    inputs = faceid_inputs(ctx, identity, policy, af, emb.EmbedPolicy(mode=embed.id_mode, max_photos=embed.id_photos,
                                                                      locator=embed.face_locator, pack=embed.face_pack))
    with attached_faceid(pipe, af, inputs, policy) as extra:
        activate_with_faceid(pipe, others, policy)
        try:
            yield AdapterUse(extra, {"adapter": af.model_id, "variant": policy.variant, "scale": policy.scale,
                                     "embedding": inputs.info()})
        finally:
            pipe.disable_lora()


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


def regional_faceid_inputs(ctx, people: Sequence[Identity], policy: FaceIDPolicy, af: AdapterFile,
                           embed_policy: emb.EmbedPolicy) -> tuple[FaceIDInputs, list[emb.IdEmbedding]]:
    """One FaceID embedding per person (the mean of their photos', unit length), as diffusers'
    several images of one IP-Adapter: id_embeds [2, n_people, d], to be masked per region."""
    import torch

    if policy.plus:
        raise BadInput("regional identities (option identities) need faceid_variant=faceid: the Plus variants "
                       "carry one CLIP face crop set per call")
    found = [emb.embed_identity(ctx, person, "faceid", embed_policy) for person in people]
    vectors = []
    for f in found:
        check_embedding_fits(af, f.vectors)
        mean = np.asarray(f.vectors, np.float32).mean(axis=0)
        vectors.append(mean / max(float(np.linalg.norm(mean)), 1e-8) * float(np.linalg.norm(f.vectors[0])))
    cond = torch.from_numpy(np.stack(vectors)).to(device=ctx.placement.device, dtype=ctx.placement.dtype)[None]
    return FaceIDInputs(torch.cat([torch.zeros_like(cond), cond]), None, found[0]), found


def activate_with_faceid(pipe, others: Sequence[tuple[str, float]], policy: FaceIDPolicy) -> None:
    """Activate the FaceID LoRA (when the checkpoint has one) together with other adapters."""
    names = [n for n, _ in others]
    weights = [w for _, w in others]
    if FACEID_LORA_ADAPTER in (getattr(pipe.unet, "peft_config", {}) or {}):
        names.append(FACEID_LORA_ADAPTER)
        weights.append(policy.lora_scale)
    if names:
        pipe.enable_lora()
        pipe.set_adapters(names, adapter_weights=weights)


# --- InstantID -------------------------------------------------------------------------------------

# Keypoint colors (RGB) and limbs of InstantID's `draw_kps` (DESIGN section 5).
KPS_COLORS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255))
KPS_LIMBS = ((0, 2), (1, 2), (3, 2), (4, 2))
KPS_STICK_WIDTH = 4
KPS_LIMB_DIM = 0.6
KPS_RADIUS = 10


def draw_kps(width: int, height: int, kps: np.ndarray) -> np.ndarray:
    """IdentityNet's condition: limbs as ellipse polygons (half-width 4) on black, dimmed
    to 0.6, then filled keypoint circles of radius 10, in InstantID's colors."""
    import cv2

    kps = np.asarray(kps, dtype=np.float64)
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    for a, b in KPS_LIMBS:
        xs, ys = kps[[a, b], 0], kps[[a, b], 1]
        length = math.hypot(xs[0] - xs[1], ys[0] - ys[1])
        angle = math.degrees(math.atan2(ys[0] - ys[1], xs[0] - xs[1]))
        polygon = cv2.ellipse2Poly((int(np.mean(xs)), int(np.mean(ys))), (int(length / 2), KPS_STICK_WIDTH),
                                   int(angle), 0, 360, 1)
        cv2.fillConvexPoly(canvas, polygon, KPS_COLORS[a])
    canvas = (canvas * KPS_LIMB_DIM).astype(np.uint8)
    for (x, y), color in zip(kps, KPS_COLORS):
        cv2.circle(canvas, (int(x), int(y)), KPS_RADIUS, color, -1)
    return canvas


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
    r = resolved(request)
    candidates = [pose_image, r.template_image, r.control_images.get("openpose")]
    chosen = next((str(p) for p in candidates if p), None) or str(request.identity.reference)
    path = Path(chosen)
    if not path.is_file():
        raise BadInput(f"{path}: pose reference does not exist")
    image = emb.read_rgb(path)
    return PoseReference(str(path), image, emb.pose_keypoints(ctx, image, str(path), "instantid", embed_policy))


def keypoint_image(pose: PoseReference, width: int, height: int) -> np.ndarray:
    h, w = pose.image.shape[:2]
    return draw_kps(width, height, fit_points(pose.kps, (w, h), width, height))


@dataclass(frozen=True)
class InstantIDInputs:
    id_embeds: Any  # torch [2, 1, 1, 512]: cat(zeros, raw antelopev2 embedding)
    embedding: emb.IdEmbedding


def instantid_adapter(ctx) -> AdapterFile:
    af = load_adapter_file(ctx, ctx.preset.model("instantid_adapter"), "instantid")
    if adapter_kind(af.state) not in ("instantid", "ip-adapter-plus"):
        raise BadInput(f"{af.path}: is not an InstantID ip-adapter.bin (no 16-query Resampler)")
    return af


def instantid_inputs(ctx, identity: Identity, af: AdapterFile, embed_policy: emb.EmbedPolicy) -> InstantIDInputs:
    import torch

    if embed_policy.mode == "all":
        raise BadInput("InstantID takes one face embedding: use id_mode=mean or best")
    found = emb.embed_identity(ctx, identity, "instantid", embed_policy)
    check_embedding_fits(af, found.vectors)
    cond = torch.from_numpy(found.vectors[:1]).to(device=ctx.placement.device, dtype=ctx.placement.dtype)
    cond = cond[None, :, None, :]  # [1, 1 image, 1 token, 512]: the Resampler reads a sequence
    return InstantIDInputs(torch.cat([torch.zeros_like(cond), cond]), found)


def face_tokens(pipe, id_embeds) -> Any:
    """The 16 projected face tokens (uncond first), by the UNet's own projection module."""
    import torch

    projection = pipe.unet.encoder_hid_proj
    where = next(projection.parameters())  # under CPU offload the UNet may sit on the CPU now
    with torch.no_grad():
        return projection([id_embeds.to(device=where.device, dtype=where.dtype)])[0].flatten(1, 2)  # [2, 16, D]


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
def attached_instantid(pipe, af: AdapterFile, inputs: InstantIDInputs, policy: InstantIDPolicy,
                       identitynet) -> Iterator[dict[str, Any]]:
    """InstantID on a ControlNet pipeline whose first ControlNet is `identitynet`."""
    with attached_ip_adapter(pipe, af):
        pipe.set_ip_adapter_scale(policy.ip_scale)
        tokens = face_tokens(pipe, inputs.id_embeds)
        with identitynet_tokens(identitynet, tokens):
            yield {"ip_adapter_image_embeds": [inputs.id_embeds.to(dtype=pipe.unet.dtype)]}
