"""PuLID (SDXL, v1.1): the ID encoder (IDFormer), its UNet attention and the EVA-CLIP glue.

Written from the published layout of `guozinan/PuLID` `pulid_v1.1.safetensors` and the
reference code (ToTheBeginning/PuLID, pulid/encoders_transformer.py and
pulid/attention_processor.py), parametrised so the make-tiny stand-in loads through the
same code at a fraction of the size; tests compare it with the reference modules.

Checkpoint keys (one flat safetensors file):
    id_adapter.latents [1, Q, D], id_adapter.proj_out [D, out]
    id_adapter.layers.{l}.0.{norm1,norm2,to_q,to_kv,to_out}   perceiver attention (l < depth, depth % 5 == 0)
    id_adapter.layers.{l}.1.{0,1,3}                           LayerNorm + 2-layer GELU MLP
    id_adapter.mapping_{0..4}.{0,1,3,4,6}                     EVA hidden state i -> D (Linear-LN-LReLU x2, Linear)
    id_adapter.id_embedding_mapping.{0,1,3,4,6}               [arcface ++ EVA embed] -> T x D
    id_adapter_attn_layers.{i}.id_to_k/id_to_v.weight          i = index in unet.attn_processors (cross-attn only)

Real sizes: D = 1024, depth 10, 16 heads of 64, Q = 32 queries, T = 5 ID tokens per photo,
out = 2048 (SDXL's cross-attention width); EVA02-CLIP-L-14-336 has width 1024 (five hidden
states, after blocks 4, 8, 12, 16, 20) and a 768 embedding; antelopev2 gives 512 -> 1280 in.

EVA02-CLIP-L-14-336 itself is timm's `eva02_large_patch14_clip_336` (open_clip's
`EVA02-L-14-336` config builds the same timm trunk): the EVA-CLIP `.pt` loads through timm's
own key conversion (`checkpoint_filter_fn`), so no vision transformer is written here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .perceiver import PerceiverAttention, feed_forward, split_scale_attention

from ..errors import bad_file
from ..modelfiles import Kind, Source

ID_PREFIX = "id_adapter."
ATTN_PREFIX = "id_adapter_attn_layers."
HEAD_DIM = 64  # the reference's dim_head; heads = inner width // 64 (1 for narrower stand-ins)
EVA_HIDDEN_BLOCKS = (4, 8, 12, 16, 20)  # hidden states are the inputs of these blocks
EVA_MODEL = "eva02_large_patch14_clip_336"


def detect(keys: Iterable[str]) -> bool:
    """A PuLID SDXL checkpoint (v1 or v1.1): an IDFormer plus per-layer id_to_k/id_to_v."""
    keys = set(keys)
    return (f"{ID_PREFIX}latents" in keys and f"{ID_PREFIX}id_embedding_mapping.0.weight" in keys
            and any(k.startswith(ATTN_PREFIX) and k.endswith(".id_to_k.weight") for k in keys))


def split_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[int, dict[str, torch.Tensor]]]:
    """(IDFormer state, {processor index: {id_to_k.weight, id_to_v.weight}})."""
    encoder = {k[len(ID_PREFIX):]: v for k, v in state.items() if k.startswith(ID_PREFIX)}
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in state.items():
        if k.startswith(ATTN_PREFIX):
            index, rest = k[len(ATTN_PREFIX):].split(".", 1)
            layers.setdefault(int(index), {})[rest] = v
    return encoder, layers


# --- IDFormer ---------------------------------------------------------------------------------------


def _mlp(inp: int, hidden: int, out: int) -> nn.Sequential:
    """Linear-LN-LeakyReLU twice, then Linear (indices 0,1,3,4,6 carry weights)."""
    return nn.Sequential(nn.Linear(inp, hidden), nn.LayerNorm(hidden), nn.LeakyReLU(),
                         nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.LeakyReLU(), nn.Linear(hidden, out))


@dataclass(frozen=True)
class IDFormerConfig:
    dim: int = 1024
    depth: int = 10
    heads: int = 16
    dim_head: int = HEAD_DIM
    num_id_token: int = 5
    num_queries: int = 32
    output_dim: int = 2048
    ff_mult: int = 4
    vit_dim: int = 1024  # EVA-CLIP width (the hidden states' last dimension)
    map_dim: int = 1024  # the mapping MLPs' hidden width
    id_dim: int = 1280  # antelopev2 (512) ++ EVA-CLIP embedding (768)

    @classmethod
    def from_state(cls, encoder: dict[str, torch.Tensor]) -> "IDFormerConfig":
        try:
            queries, dim = encoder["latents"].shape[1:]
            depth = 1 + max(int(k.split(".")[1]) for k in encoder if k.startswith("layers."))
            inner = encoder["layers.0.0.to_q.weight"].shape[0]
            heads = max(1, inner // HEAD_DIM)
            return cls(dim=int(dim), depth=depth, heads=heads, dim_head=inner // heads,
                       num_id_token=encoder["id_embedding_mapping.6.weight"].shape[0] // int(dim),
                       num_queries=int(queries), output_dim=encoder["proj_out"].shape[1],
                       ff_mult=encoder["layers.0.1.1.weight"].shape[0] // int(dim),
                       vit_dim=encoder["mapping_0.0.weight"].shape[1], map_dim=encoder["mapping_0.0.weight"].shape[0],
                       id_dim=encoder["id_embedding_mapping.0.weight"].shape[1])
        except (KeyError, ValueError, IndexError) as exc:
            raise ValueError(f"not a PuLID IDFormer state (missing or odd {exc})") from None


class IDFormer(nn.Module):
    """The ID encoder: learned queries plus T tokens per photo from the ID vector, refined by
    perceiver layers that read the five EVA hidden states in turn (depth / 5 layers each)."""

    def __init__(self, c: IDFormerConfig = IDFormerConfig()):
        super().__init__()
        if c.depth % 5:
            raise ValueError(f"IDFormer depth {c.depth} is not a multiple of 5")
        self.config = c
        self.latents = nn.Parameter(torch.zeros(1, c.num_queries, c.dim))
        self.proj_out = nn.Parameter(torch.zeros(c.dim, c.output_dim))
        self.layers = nn.ModuleList(nn.ModuleList([PerceiverAttention(c.dim, dim_head=c.dim_head, heads=c.heads),
                                                   feed_forward(c.dim, c.ff_mult)]) for _ in range(c.depth))
        for i in range(5):
            setattr(self, f"mapping_{i}", _mlp(c.vit_dim, c.map_dim, c.dim))
        self.id_embedding_mapping = _mlp(c.id_dim, c.map_dim, c.dim * c.num_id_token)

    def forward(self, id_vectors: torch.Tensor, vit_hidden: Sequence[torch.Tensor]) -> torch.Tensor:
        """id_vectors [B, P, id_dim] (P photos of one identity, or [B, id_dim]); vit_hidden:
        five [B, P * L, vit_dim] (the photos' tokens side by side) -> [B, Q, output_dim]."""
        c = self.config
        photos = id_vectors.shape[1] if id_vectors.ndim == 3 else 1
        tokens = self.id_embedding_mapping(id_vectors).reshape(id_vectors.shape[0], c.num_id_token * photos, c.dim)
        latents = torch.cat([self.latents.expand(id_vectors.shape[0], -1, -1), tokens], dim=1)
        per_scale = c.depth // 5
        for i in range(5):
            context = torch.cat([tokens, getattr(self, f"mapping_{i}")(vit_hidden[i])], dim=1)
            for attn, ff in self.layers[i * per_scale:(i + 1) * per_scale]:
                latents = latents + attn(context, latents)
                latents = latents + ff(latents)
        return latents[:, :c.num_queries] @ self.proj_out


def build_idformer(encoder: dict[str, torch.Tensor]) -> IDFormer:
    model = IDFormer(IDFormerConfig.from_state(encoder))
    model.load_state_dict(encoder, strict=True)
    return model.eval()


# --- the UNet's ID attention ------------------------------------------------------------------------


@dataclass(frozen=True)
class IDMode:
    """How ID attention is added (the reference's module switches NUM_ZERO / ORTHO / ORTHO_v2)."""

    num_zero: int = 0  # zero tokens appended to the ID tokens (dilutes the ID attention)
    ortho: str = "off"  # off | v1 (add only the part orthogonal to the text attention) | v2

    def __post_init__(self):
        if self.ortho not in ("off", "v1", "v2"):
            raise ValueError(f"ortho '{self.ortho}' is not off, v1 or v2")




class IDState:
    """What every ID processor of one UNet reads during a call: the ID tokens ([batch, n, C],
    rows matching the UNet batch, e.g. uncond then cond under CFG), scale and mode. Set by the
    backend around a call; None tokens make the processors plain attention."""

    def __init__(self):
        self.tokens: torch.Tensor | None = None
        self.scale: float = 1.0
        self.mode: IDMode = IDMode()


class IDAttnProcessor(nn.Module):
    """diffusers attention processor: scaled dot-product attention over the text, plus
    `scale` x attention over the ID tokens (their own id_to_k / id_to_v), added before the
    output projection. With no tokens (or on self-attention) it is diffusers' AttnProcessor2_0."""

    def __init__(self, hidden_size: int, cross_attention_dim: int, state: IDState):
        super().__init__()
        self.id_to_k = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.id_to_v = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.state = state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        spatial = hidden_states.ndim == 4
        if spatial:
            b, ch, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, ch, h * w).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attention_mask is not None:
            length = (encoder_hidden_states if encoder_hidden_states is not None else hidden_states).shape[1]
            attention_mask = attn.prepare_attention_mask(attention_mask, length, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        key, value = attn.to_k(context), attn.to_v(context)
        head = key.shape[-1] // attn.heads

        def heads(t):
            return t.view(batch, -1, attn.heads, head).transpose(1, 2)

        def merge(t):
            return t.transpose(1, 2).reshape(batch, -1, attn.heads * head).to(query.dtype)

        q = heads(query)
        out = merge(F.scaled_dot_product_attention(q, heads(key), heads(value), attn_mask=attention_mask))
        tokens = self.state.tokens
        if tokens is not None and encoder_hidden_states is not None:
            out = self._add_id(out, q, tokens.to(device=query.device, dtype=query.dtype), heads, merge)
        out = attn.to_out[1](attn.to_out[0](out))
        if spatial:
            out = out.transpose(-1, -2).reshape(b, ch, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _add_id(self, out, q, tokens, heads, merge):
        mode, scale = self.state.mode, self.state.scale
        if mode.num_zero:
            tokens = torch.cat([tokens, tokens.new_zeros(tokens.shape[0], mode.num_zero, tokens.shape[2])], dim=1)
        id_key = heads(self.id_to_k(tokens).to(q.dtype))
        id_out = merge(F.scaled_dot_product_attention(q, id_key, heads(self.id_to_v(tokens).to(q.dtype))))
        if mode.ortho == "off":
            return out + scale * id_out
        dtype = out.dtype
        text, ident = out.float(), id_out.float()
        # Projection of the ID output onto the text output, per channel over the sequence (dim -2), as the
        # reference computes it.
        # Where the text output is all zeros (SDXL's zeroed empty negative prompt with no value bias) the
        # reference divides 0 by 0; the projection onto a zero vector is zero, so that is used instead.
        energy = (text * text).sum(dim=-2, keepdim=True)
        ratio = (text * ident).sum(dim=-2, keepdim=True) / torch.where(energy == 0, torch.ones_like(energy), energy)
        parallel = ratio * text
        if mode.ortho == "v1":
            return (text + scale * (ident - parallel)).to(dtype)
        # v2: keep a share of the parallel part equal to the attention mass on the first 5 ID tokens
        # (unscaled logits, averaged over heads).
        mass = (q @ id_key.transpose(-2, -1)).softmax(dim=-1).mean(dim=1)[:, :, :5].sum(dim=-1, keepdim=True)
        return (text + scale * (ident + (mass - 1) * parallel)).to(dtype)


def id_processors(unet, layers: dict[int, dict[str, torch.Tensor]], state: IDState) -> dict:
    """A processor per attention layer of `unet` (in attn_processors order): ID processors
    with the checkpoint's weights on cross-attention, diffusers' AttnProcessor2_0 elsewhere.
    The checkpoint must hold exactly the cross-attention indices (ValueError otherwise)."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    names = list(unet.attn_processors)
    cross = [i for i, n in enumerate(names) if not n.endswith("attn1.processor")]
    if sorted(layers) != cross:
        raise ValueError(f"ID attention layers {sorted(layers)[:6]}... do not match this UNet's "
                         f"{len(cross)} cross-attention layers")
    param = next(unet.parameters())
    procs = {}
    for i, name in enumerate(names):
        if i not in layers:
            procs[name] = AttnProcessor2_0()
            continue
        w = layers[i]
        hidden, cross_dim = w["id_to_k.weight"].shape
        proc = IDAttnProcessor(hidden, cross_dim, state)
        proc.load_state_dict(w, strict=True)
        procs[name] = proc.to(device=param.device, dtype=param.dtype)
    return procs


# --- EVA02-CLIP-L-14-336 ----------------------------------------------------------------------------


def eva_clip_visual_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The `visual.*` part of an EVA-CLIP checkpoint (the text tower is not needed)."""
    state = state.get("state_dict", state) if isinstance(state.get("state_dict"), dict) else state
    visual = {k: v for k, v in state.items() if k.startswith("visual.")}
    if "visual.pos_embed" not in visual or "visual.head.weight" not in visual:
        raise ValueError("not an EVA-CLIP checkpoint (no visual.pos_embed / visual.head)")
    return visual


def eva_config_from_state(visual: dict[str, torch.Tensor]) -> dict:
    """timm Eva arguments for an EVA02-CLIP visual tower of any width (real: L-14-336)."""
    width = visual["visual.cls_token"].shape[-1]
    patch = visual["visual.patch_embed.proj.weight"].shape[-1]
    tokens = visual["visual.pos_embed"].shape[1] - 1
    grid = int(round(math.sqrt(tokens)))
    depth = 1 + max(int(k.split(".")[2]) for k in visual if k.startswith("visual.blocks."))
    hidden = visual["visual.blocks.0.mlp.w1.weight"].shape[0]
    heads = max(1, width // HEAD_DIM)
    return dict(img_size=grid * patch, patch_size=patch, embed_dim=width, depth=depth, num_heads=heads,
                mlp_ratio=hidden / width, qkv_fused=False, swiglu_mlp=True, scale_mlp=True, scale_attn_inner=True,
                use_rot_pos_emb=True, ref_feat_shape=(16, 16) if grid * patch == 336 else (grid, grid),
                global_pool="token", num_classes=visual["visual.head.weight"].shape[0])


class EvaVisual(nn.Module):
    """EVA-CLIP's visual tower on timm's Eva: returns (embedding, five hidden states) as
    PuLID reads them (the class token after the final norm and head; the inputs of blocks
    4, 8, 12, 16 and 20)."""

    def __init__(self, trunk, taps: tuple[int, ...]):
        super().__init__()
        self.trunk = trunk
        self.taps = taps
        self.image_size = trunk.patch_embed.img_size[0]

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        t = self.trunk
        x = t.patch_embed(pixels)
        x, rope = t._pos_embed(x)
        x = t.norm_pre(x)
        hidden = []
        for i, block in enumerate(t.blocks):
            if i in self.taps:
                hidden.append(x)
            x = block(x, rope=rope)
        return t.forward_head(t.norm(x)), hidden


def build_eva_visual(state: dict[str, torch.Tensor]) -> EvaVisual:
    from timm.models.eva import Eva, checkpoint_filter_fn

    visual = eva_clip_visual_state(state)
    config = eva_config_from_state(visual)
    trunk = Eva(**config)
    trunk.load_state_dict(checkpoint_filter_fn(visual, trunk), strict=True)
    if config["depth"] <= EVA_HIDDEN_BLOCKS[-1]:
        raise ValueError(f"EVA depth {config['depth']}: PuLID reads the inputs of blocks {EVA_HIDDEN_BLOCKS}")
    return EvaVisual(trunk, EVA_HIDDEN_BLOCKS).eval()


# --- PuLID-FLUX (v0.9.0 / v0.9.1) --------------------------------------------------------------------
#
# `pulid_flux_v0.9.1.safetensors`: `pulid_encoder.*` (an IDFormer as above, output 2048) and
# `pulid_ca.{k}.{norm1,norm2,to_q,to_kv,to_out}` (k < 20): cross-attention from the image
# tokens of FLUX's stream (width 3072, queries) to the ID tokens (width 2048, keys/values),
# added to the image stream after double block i when i % 2 == 0 and after single block i
# (its image part) when i % 4 == 0, in that order (ceil(19 / 2) + ceil(38 / 4) = 20 modules).

FLUX_PREFIX_ENCODER = "pulid_encoder."
FLUX_PREFIX_CA = "pulid_ca."
FLUX_DOUBLE_INTERVAL = 2
FLUX_SINGLE_INTERVAL = 4
CA_HEAD_DIM = 128  # PerceiverAttentionCA's dim_head (16 heads of 128 in the real file)


def detect_flux(keys: Iterable[str]) -> bool:
    keys = set(keys)
    return f"{FLUX_PREFIX_ENCODER}latents" in keys and f"{FLUX_PREFIX_CA}0.to_q.weight" in keys


def split_flux_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """(IDFormer state, [the k-th cross-attention's state, in order])."""
    encoder = {k[len(FLUX_PREFIX_ENCODER):]: v for k, v in state.items() if k.startswith(FLUX_PREFIX_ENCODER)}
    blocks: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in state.items():
        if k.startswith(FLUX_PREFIX_CA):
            index, rest = k[len(FLUX_PREFIX_CA):].split(".", 1)
            blocks.setdefault(int(index), {})[rest] = v
    if sorted(blocks) != list(range(len(blocks))):
        raise ValueError(f"pulid_ca indices {sorted(blocks)} are not 0..{len(blocks) - 1}")
    return encoder, [blocks[i] for i in range(len(blocks))]


class PerceiverAttentionCA(PerceiverAttention):
    """Image tokens (queries) attend to the ID tokens only; no residual inside (the caller adds)."""

    def forward(self, id_tokens: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        id_tokens, image = self.norm1(id_tokens), self.norm2(image)
        k, v = self.to_kv(id_tokens).chunk(2, dim=-1)
        return self.to_out(split_scale_attention(self.to_q(image), k, v, self.heads, self.dim_head))


def build_flux_ca(blocks: Sequence[dict[str, torch.Tensor]]) -> nn.ModuleList:
    modules = []
    for i, w in enumerate(blocks):
        try:
            inner, dim = w["to_q.weight"].shape
            kv_dim = w["to_kv.weight"].shape[1]
        except KeyError as exc:
            raise ValueError(f"pulid_ca.{i} has no {exc}") from None
        heads = max(1, inner // CA_HEAD_DIM)
        module = PerceiverAttentionCA(dim, dim_head=inner // heads, heads=heads, kv_dim=kv_dim)
        module.load_state_dict(w, strict=True)
        modules.append(module)
    return nn.ModuleList(modules).eval()


def flux_ca_count(double_blocks: int, single_blocks: int) -> int:
    return -(-double_blocks // FLUX_DOUBLE_INTERVAL) + -(-single_blocks // FLUX_SINGLE_INTERVAL)


class FluxIDState:
    """What the block hooks read during one transformer call: ID tokens [B, Q, kv_dim] (None: no
    ID this call, e.g. before start_step) and id_weight."""

    def __init__(self):
        self.tokens: torch.Tensor | None = None
        self.weight: float = 1.0


def flux_id_hooks(transformer, ca: nn.ModuleList, state: FluxIDState) -> list:
    """Forward hooks on a diffusers FluxTransformer2DModel's blocks adding
    id_weight x ca[k](tokens, image stream) where PuLID-FLUX adds it; returns the handles."""
    doubles, singles = list(transformer.transformer_blocks), list(transformer.single_transformer_blocks)
    expected = flux_ca_count(len(doubles), len(singles))
    if len(ca) != expected:
        raise ValueError(f"{len(ca)} ID cross-attention modules; this transformer ({len(doubles)} double, "
                         f"{len(singles)} single blocks) takes {expected}")
    targets = [b for i, b in enumerate(doubles) if i % FLUX_DOUBLE_INTERVAL == 0]
    targets += [b for i, b in enumerate(singles) if i % FLUX_SINGLE_INTERVAL == 0]
    handles = []
    for module, block in zip(ca, targets):
        def hook(_block, _args, output, _ca=module):
            if state.tokens is None:
                return output
            text, image = output  # diffusers' blocks return (encoder_hidden_states, hidden_states)
            tokens = state.tokens.to(device=image.device, dtype=image.dtype)
            return text, image + state.weight * _ca(tokens, image)

        handles.append(block.register_forward_hook(hook))
    return handles


# --- the model door's kinds ---------------------------------------------------------------------


def _pulid(source: Source):
    """PuLID (SDXL) checkpoint: (IDFormer placed on the device, {processor index: id_to_k/id_to_v weights})."""
    state = source.weights()
    if not detect(state):
        raise bad_file(source.path, "is not a PuLID SDXL checkpoint (no id_adapter / id_adapter_attn_layers keys)")
    encoder, layers = split_state(state)
    try:
        model = build_idformer(encoder)
    except (ValueError, RuntimeError) as exc:
        raise bad_file(source.path, f"cannot be loaded as PuLID's IDFormer ({str(exc).splitlines()[0]})") from None
    return source.place(model), layers


def _pulid_flux(source: Source):
    """PuLID-FLUX checkpoint: (IDFormer, ModuleList of the ID cross-attentions), both placed on the device."""
    state = source.weights()
    if not detect_flux(state):
        raise bad_file(source.path, "is not a PuLID-FLUX checkpoint (no pulid_encoder / pulid_ca keys)")
    try:
        encoder, blocks = split_flux_state(state)
        model, ca = build_idformer(encoder), build_flux_ca(blocks)
    except (ValueError, RuntimeError) as exc:
        raise bad_file(source.path, f"cannot be loaded as PuLID-FLUX ({str(exc).splitlines()[0]})") from None
    return source.place(model), source.place(ca)


def _eva_clip(source: Source):
    """EVA-CLIP visual tower (EVA02-CLIP-L-14-336 `.pt`) on timm's Eva: embedding + PuLID's five hidden states."""
    try:
        return build_eva_visual(source.weights())
    except (ValueError, RuntimeError, KeyError) as exc:
        raise bad_file(source.path, f"cannot be loaded as EVA02-CLIP ({str(exc).splitlines()[0]})") from None


PULID = Kind("pulid", _pulid, detect=detect)
PULID_FLUX = Kind("pulid-flux", _pulid_flux, detect=detect_flux)
EVA_CLIP = Kind("eva-clip", _eva_clip, place=True)
