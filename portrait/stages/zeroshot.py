"""The IP-Adapter plumbing several backends share: attaching an IP-Adapter-style checkpoint to
any diffusers pipeline for one request, and IP-Adapter FaceID (FaceID / Plus / PlusV2).

FaceID is used by two backends (stages/backends/faceid.py, and the `template` backend's
inpainting passes with `identity_adapter: faceid`), so it lives here and no backend imports
another. What only one backend uses lives in that backend: InstantID's face tokens, IdentityNet
and keypoints in stages/backends/instantid.py, FaceID's regions in stages/backends/faceid.py;
checkpoint detection by keys in portrait/core/archs/ip_adapter.py.

Pipelines come from portrait.core.loaders and share their UNet with every other pipeline
of the base (and with other backends in a batch run). An adapter is attached once per loaded
pipeline and kept while the pipeline is cached (`attached_ip_adapter`); a backend that runs
without it gets the UNet back without it (sd.load_sd_pipeline), and another checkpoint
replaces it. Its state dict is read once and kept in ctx.cache.

FaceID / FaceID-Plus / PlusV2 go through diffusers' own `load_ip_adapter` (their LoRA becomes
the PEFT adapter `faceid_0`, as diffusers does it) and `ip_adapter_image_embeds` =
[cat(zeros, id)]; Plus sets the CLIP hidden states (and V2 the shortcut) on diffusers'
projection module, the documented way.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping, Sequence

import numpy as np

from pydantic import BaseModel, ValidationError

from portrait.core import models
from portrait.core.backend import AdapterSpace
from portrait.core.declare import describe
from portrait.core.errors import BadInput
from portrait.core.models import Weights
from portrait.core.archs import ip_adapter as ip_arch
from portrait.core.archs.ip_adapter import adapter_kind
from portrait.core.options import EmbedOptions, FaceIDAdapterOptions
from portrait.core.types import GenerationRequest, Identity
from portrait.stages import embed as emb
from portrait.stages.identity_inputs import embed_policy_of
from portrait.stages.sd import FACEID_LORA_ADAPTER, IP_ADAPTER_MARK, attached_adapter, detach_ip_adapter  # noqa: F401

FaceIDVariant = Literal["faceid", "plusv2", "plus"]
FACEID_ROLES = {"faceid": "faceid", "plusv2": "faceid_plus", "plus": "faceid_plus_v1"}

# The face space IP-Adapter FaceID was trained on: insightface buffalo_l's w600k_r50
# `normed_embedding`. Plus / PlusV2 read the same space (with CLIP ViT-H of the face crop beside
# it); they are named apart so a message says which adapter refused a pack.
FACEID_SPACE = AdapterSpace("faceid", "buffalo_l", "w600k_r50.onnx", normalized=True)
FACEID_PLUS_SPACE = AdapterSpace("faceid_plus", "buffalo_l", "w600k_r50.onnx", normalized=True)


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

    @property
    def space(self) -> AdapterSpace:
        return FACEID_PLUS_SPACE if self.plus else FACEID_SPACE


def faceid_space(options: FaceIDAdapterOptions | Mapping[str, Any]) -> AdapterSpace:
    """The face space of the FaceID variant these options choose (a BackendSpec's `face_space`)."""
    return FaceIDPolicy.from_options(options).space


def _typed(model: type[BaseModel], options: BaseModel | Mapping[str, Any]) -> Any:
    """`options` as `model`: a request's typed options that include it as they are, else the keys
    of a mapping that `model` declares, validated (a bad value is one BadInput line)."""
    if isinstance(options, model):
        return options
    if isinstance(options, BaseModel):
        options = options.model_dump(exclude_unset=True)
    try:
        return model.model_validate({k: v for k, v in options.items() if k in model.model_fields})
    except ValidationError as exc:
        raise BadInput(f"option {describe(exc)}") from None


# --- adapter files -------------------------------------------------------------------------------


# An IP-Adapter-style checkpoint in memory: (model_id, path, state {"image_proj", "ip_adapter"}),
# as the model door's "ip-adapter" kind builds it.
AdapterFile = Weights


def _explicit(model_id_or_path: str) -> Path | None:
    """The user's own file (a path, not a registry id)."""
    path = Path(str(model_id_or_path)).expanduser()
    return path if path.suffix in (".bin", ".safetensors") or "/" in str(model_id_or_path) else None


def load_adapter_file(ctx, model_id_or_path: str, name: str | None = None) -> AdapterFile:
    """An IP-Adapter-style checkpoint (registry id, or the user's file described by the
    FaceID / InstantID entry), through the model door: read once per process."""
    explicit = _explicit(model_id_or_path)
    if explicit is None:
        return models.load(ctx, model_id_or_path, "ip-adapter")
    described_by = "instantid-adapter" if name == "instantid" else "ip-adapter-faceid-sd15"
    return models.load(ctx, described_by, "ip-adapter", path=explicit)


def check_adapter(af: AdapterFile, want: str) -> None:
    kind = adapter_kind(af.state)
    if kind != want:
        raise BadInput(f"{af.path}: is an {kind} checkpoint, not {want}")


def id_input_dim(af: AdapterFile) -> int:
    return ip_arch.id_input_dim(af.state)


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
    """An IP-Adapter checkpoint on the pipeline's UNet for the block: attached once per loaded
    pipeline and kept while it is cached (a second request with the same checkpoint attaches
    nothing; another checkpoint replaces it; a backend without one gets the UNet without it
    from sd.load_sd_pipeline). Attaching goes through diffusers' `load_ip_adapter`, which under
    an offload strategy re-applies the offload hooks."""
    key = (af.model_id, str(af.path), id(af.state))
    if attached_adapter(pipe) != key:
        detach_ip_adapter(pipe)
        peft = getattr(pipe.unet, "peft_config", {}) or {}
        if FACEID_LORA_ADAPTER in peft:
            # diffusers names every first IP-Adapter LoRA `faceid_0` and skips loading when the
            # name exists: a stale one (another FaceID variant) must go first.
            pipe.delete_adapters([FACEID_LORA_ADAPTER])
        with quiet("diffusers.loaders.ip_adapter"):  # "image_encoder is not loaded": we pass embeddings
            pipe.load_ip_adapter(af.state, subfolder=None, weight_name=None, image_encoder_folder=None)
        setattr(pipe.unet, IP_ADAPTER_MARK, key)
    yield


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
    """CLIP ViT-H (h94/IP-Adapter models/image_encoder) and its 224 px processor, through the
    model door (cached; unpacks as (model, processor))."""
    return models.load(ctx, ctx.preset.model("clip_vision"), "clip-vision", file="models/image_encoder")


def faceid_inputs(ctx, identity: Identity, policy: FaceIDPolicy, af: AdapterFile,
                  embed_policy: emb.EmbedPolicy) -> FaceIDInputs:
    """buffalo_l normed embeddings (+ CLIP ViT-H of the 224 face crops for Plus) of the identity."""
    import torch

    found = emb.embed_identity(ctx, identity, policy.space, embed_policy)
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
    af = faceid_adapter(ctx, policy)
    inputs = faceid_inputs(ctx, identity, policy, af, embed_policy_of(_typed(EmbedOptions, request.options)))
    with attached_faceid(pipe, af, inputs, policy) as extra:
        activate_with_faceid(pipe, others, policy)
        try:
            yield AdapterUse(extra, {"adapter": af.model_id, "variant": policy.variant, "scale": policy.scale,
                                     "embedding": inputs.info()})
        finally:
            pipe.disable_lora()


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
