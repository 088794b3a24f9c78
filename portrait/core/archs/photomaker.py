"""PhotoMaker's ID encoder (v1 and v2): the network and its checkpoint detection by keys.

Pure torch + transformers' CLIP vision tower, no pipeline knowledge (the backend,
stages/backends/photomaker.py, reads the checkpoint, builds the encoder from it and does the
prompt surgery). Written from PhotoMaker's published architecture, not its package:

- v1: pooled CLIP -> visual_projection (768) ++ visual_projection_2 (1024 -> 1280) = one
  2048-d token per photo;
- v2: a `qformer_perceiver` that turns each photo's insightface (buffalo_l, raw) embedding
  into 2 tokens and refines them against CLIP's last_hidden_state.

Sizes are read from the state dict (`encoder_shape`), so the real checkpoint and the tiny
stand-in build the same classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BadInput, bad_file
from ..modelfiles import Kind, Source, Weights, nested, read_weights, weights_name

PHOTOMAKER_KEYS = ["id_encoder", "lora_weights"]  # a PhotoMaker .bin holds exactly these
V2_HEAD_DIM = 128


def detect(keys: Iterable[str]) -> bool:
    """A PhotoMaker checkpoint: top-level keys exactly id_encoder, lora_weights (or their
    flattened `id_encoder.*` / `lora_weights.*` safetensors form)."""
    keys = list(keys)
    if keys == PHOTOMAKER_KEYS:
        return True
    heads = {k.partition(".")[0] for k in keys}
    return bool(keys) and heads == set(PHOTOMAKER_KEYS)


# --- the ID encoder (written from the architecture; see module docstring) ------------------------


class MLP(nn.Module):
    """LayerNorm -> Linear -> GELU -> Linear (+ residual)."""

    def __init__(self, inp: int, out: int, hidden: int, residual: bool):
        super().__init__()
        self.layernorm = nn.LayerNorm(inp)
        self.fc1 = nn.Linear(inp, hidden)
        self.fc2 = nn.Linear(hidden, out)
        self.act_fn = nn.GELU()
        self.residual = residual

    def forward(self, x):
        y = self.fc2(self.act_fn(self.fc1(self.layernorm(x))))
        return y + x if self.residual else y


class FuseModule(nn.Module):
    """Merges a class-word token with an ID token: MLP(cat) + word, MLP with residual, LayerNorm."""

    def __init__(self, dim: int):
        super().__init__()
        self.mlp1 = MLP(2 * dim, dim, dim, residual=False)
        self.mlp2 = MLP(dim, dim, dim, residual=True)
        self.layer_norm = nn.LayerNorm(dim)

    def fuse(self, words, ids):
        x = self.mlp1(torch.cat([words, ids], dim=-1)) + words
        return self.layer_norm(self.mlp2(x))

    def forward(self, prompt_embeds, id_tokens, class_mask):
        """prompt_embeds [1, seq, D]; id_tokens [n, D] in photo order; class_mask [1, seq] with n True."""
        positions = class_mask[0].nonzero().squeeze(1)
        if positions.numel() != id_tokens.shape[0]:
            raise ValueError(f"{positions.numel()} class-word slots for {id_tokens.shape[0]} ID tokens")
        out = prompt_embeds.clone()
        out[0, positions] = self.fuse(prompt_embeds[0, positions], id_tokens.to(prompt_embeds.dtype))
        return out


class PerceiverAttention(nn.Module):
    """IP-Adapter's perceiver attention: latents attend to (inputs ++ latents)."""

    def __init__(self, dim: int, inner: int, dim_head: int):
        super().__init__()
        self.heads = inner // dim_head
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x, latents):
        x, latents = self.norm1(x), self.norm2(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=-2)).chunk(2, dim=-1)

        def heads(t):
            return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(q).float(), heads(k).float(), heads(v).float()).to(q.dtype)
        return self.to_out(out.transpose(1, 2).flatten(2))


class PerceiverResampler(nn.Module):
    """FacePerceiverResampler: proj_in, [attention, feed-forward] x depth, proj_out, norm_out."""

    def __init__(self, dim: int, inner: int, dim_head: int, depth: int, embedding_dim: int, output_dim: int,
                 ff_mult: int = 4):
        super().__init__()
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList([
            nn.ModuleList([
                PerceiverAttention(dim, inner, dim_head),
                nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * ff_mult, bias=False), nn.GELU(),
                              nn.Linear(dim * ff_mult, dim, bias=False)),
            ]) for _ in range(depth)
        ])

    def forward(self, latents, x):
        x = self.proj_in(x)
        for attention, feed_forward in self.layers:
            latents = attention(x, latents) + latents
            latents = feed_forward(latents) + latents
        return self.norm_out(self.proj_out(latents))


class QFormerPerceiver(nn.Module):
    """v2: ID embedding -> `tokens` tokens, refined against CLIP patch features (+ residual)."""

    def __init__(self, id_dim: int, dim: int, tokens: int, clip_dim: int, inner: int, depth: int, ratio: int = 4):
        super().__init__()
        self.tokens, self.dim = tokens, dim
        self.token_proj = nn.Sequential(nn.Linear(id_dim, id_dim * ratio), nn.GELU(),
                                        nn.Linear(id_dim * ratio, dim * tokens))
        self.token_norm = nn.LayerNorm(dim)
        self.perceiver_resampler = PerceiverResampler(dim, inner, V2_HEAD_DIM, depth, clip_dim, dim)

    def forward(self, id_embeds, clip_hidden):
        x = self.token_norm(self.token_proj(id_embeds).reshape(-1, self.tokens, self.dim))
        return x + self.perceiver_resampler(x, clip_hidden)


@dataclass(frozen=True)
class EncoderShape:
    """Sizes read from a checkpoint, so real and tiny files build the same classes."""

    version: int
    clip: dict[str, Any]
    dim: int  # fused token width (SDXL: 2048)
    text_2: int  # visual_projection_2 output (SDXL text_encoder_2 width)
    id_dim: int = 0
    tokens: int = 1
    perceiver_inner: int = 0
    perceiver_depth: int = 0


def detect_version(id_encoder: dict) -> int:
    """2 when the checkpoint carries v2's qformer_perceiver, else 1."""
    return 2 if any(k.startswith("qformer_perceiver.") for k in id_encoder) else 1


def encoder_shape(sd: dict) -> EncoderShape:
    hidden = int(sd["vision_model.embeddings.class_embedding"].shape[0])
    patch = int(sd["vision_model.embeddings.patch_embedding.weight"].shape[-1])
    positions = int(sd["vision_model.embeddings.position_embedding.weight"].shape[0])
    layers = len({k.split(".")[3] for k in sd if k.startswith("vision_model.encoder.layers.")})
    clip = dict(hidden_size=hidden, patch_size=patch, image_size=patch * int(round((positions - 1) ** 0.5)),
                num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                intermediate_size=int(sd["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0]),
                projection_dim=int(sd["visual_projection.weight"].shape[0]), hidden_act="quick_gelu")
    dim = int(sd["fuse_module.layer_norm.weight"].shape[0])
    text_2 = int(sd["visual_projection_2.weight"].shape[0])
    if detect_version(sd) == 1:
        return EncoderShape(1, clip, dim, text_2)
    q = "qformer_perceiver."
    depth = len({k.split(".")[3] for k in sd if k.startswith(f"{q}perceiver_resampler.layers.")})
    return EncoderShape(2, clip, dim, text_2, id_dim=int(sd[f"{q}token_proj.0.weight"].shape[1]),
                        tokens=int(sd[f"{q}token_proj.2.weight"].shape[0]) // dim,
                        perceiver_inner=int(sd[f"{q}perceiver_resampler.layers.0.0.to_q.weight"].shape[0]),
                        perceiver_depth=depth)


def build_encoder(shape: EncoderShape):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection


    class PhotoMakerIDEncoder(CLIPVisionModelWithProjection):
        """CLIP ViT-L tower + PhotoMaker's projections and fuse module (state dict keys as released)."""

        def __init__(self):
            super().__init__(CLIPVisionConfig(**shape.clip))
            self.shape = shape
            self.visual_projection_2 = nn.Linear(shape.clip["hidden_size"], shape.text_2, bias=False)
            self.fuse_module = FuseModule(shape.dim)
            if shape.version == 2:
                self.qformer_perceiver = QFormerPerceiver(shape.id_dim, shape.dim, shape.tokens,
                                                          shape.clip["hidden_size"], shape.perceiver_inner,
                                                          shape.perceiver_depth)

        @property
        def tokens_per_image(self) -> int:
            return self.shape.tokens if self.shape.version == 2 else 1

        def id_tokens(self, pixels, id_embeds=None):
            """[n photos, 3, H, W] -> [n * tokens_per_image, D] in photo order."""
            out = self.vision_model(pixel_values=pixels)
            if self.shape.version == 1:
                pooled = out[1]
                return torch.cat([self.visual_projection(pooled), self.visual_projection_2(pooled)], dim=-1)
            if id_embeds is None:
                raise ValueError("PhotoMaker v2 needs insightface embeddings of the ID photos")
            tokens = self.qformer_perceiver(id_embeds.to(out[0].dtype), out[0])
            return tokens.reshape(-1, self.shape.dim)

    return PhotoMakerIDEncoder()


# --- the model door's kinds ---------------------------------------------------------------------


@dataclass
class PhotoMakerModel:
    model_id: str
    path: Path
    version: int
    encoder: Any
    lora: dict
    processor: Any


def _photomaker_checkpoint(source: Source) -> Weights:
    """A PhotoMaker v1/v2 checkpoint {id_encoder, lora_weights} (.bin, or flat .safetensors);
    the backend builds its ID encoder from `state["id_encoder"]`."""
    name = weights_name(source, (".bin", ".safetensors"))
    state = nested(read_weights(source.ctx, source.resolved, name), tuple(PHOTOMAKER_KEYS))
    path = source.resolved.file(name) if name else source.resolved.path
    if not isinstance(state, dict) or list(state) != PHOTOMAKER_KEYS:
        raise bad_file(path, "not a PhotoMaker checkpoint (its keys must be exactly id_encoder, lora_weights)")
    return Weights(source.model_id, path, state)



def _build_encoder(source: Source, expected: int | None = None) -> PhotoMakerModel:
    """PhotoMaker's ID encoder (CLIP ViT-L + projections + fuse module, v2's qformer_perceiver)
    from a PhotoMaker checkpoint, with its CLIP processor and the checkpoint's LoRA."""
    from transformers import CLIPImageProcessor

    ctx = source.ctx
    weights = source.load(source.model_id, "photomaker-checkpoint", path=source.explicit)
    model_id, path, state = weights.model_id, weights.path, weights.state
    found = detect_version(state["id_encoder"])
    if expected is not None and found != expected:
        raise BadInput(f"{path}: is a PhotoMaker v{found} checkpoint "
                       f"({'has' if found == 2 else 'has no'} qformer_perceiver), but v{expected} was asked "
                       f"for; use photomaker_version={found} or the photomaker-v{expected} model")
    encoder = build_encoder(encoder_shape(state["id_encoder"]))
    try:
        encoder.load_state_dict(state["id_encoder"], strict=True)
    except RuntimeError as exc:
        raise BadInput(f"{path}: id_encoder does not match PhotoMaker v{found} "
                       f"({str(exc).splitlines()[0][:200]})") from None
    encoder = encoder.to(device=ctx.placement.device, dtype=ctx.placement.dtype).eval()
    size = int(encoder.config.image_size)
    processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return PhotoMakerModel(model_id, path, found, encoder, state["lora_weights"], processor)


CHECKPOINT = Kind("photomaker-checkpoint", _photomaker_checkpoint, detect=detect)
ENCODER = Kind("photomaker", _build_encoder)
