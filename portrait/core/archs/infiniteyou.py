"""InfiniteYou's identity projection: a perceiver Resampler from one ArcFace vector to N tokens.

InfiniteYou-FLUX v1.0 (`image_proj_model.bin` = {"image_proj": state}) projects a 512-d ArcFace
embedding to 8 tokens of 4096 (FLUX's joint_attention_dim), which the InfuseNet (a
FluxControlNetModel) reads as its `encoder_hidden_states`. The layout is open_flamingo's /
IP-Adapter-Plus's Resampler: learned `latents` [1, N, dim], `proj_in` [dim, 512],
`layers.{i}.0` PerceiverAttention (norm1 on the features, norm2 on the latents, to_q, to_kv
over [features; latents], to_out, all bias-free), `layers.{i}.1` a LayerNorm + 4x GELU MLP,
then `proj_out` and `norm_out`. Real sizes: dim 1280, depth 4, 20 heads of 64, 8 queries.

Written here rather than taken from diffusers' IPAdapterPlusImageProjection because that class
expects its own converted key names, and the sizes must be read from the checkpoint (the
tiny stand-in is 64 wide); the math is checked against the reference file in the tests.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import nn

from .perceiver import PerceiverAttention, feed_forward

from ..errors import BadInput
from ..modelfiles import Kind

PREFIX_KEYS = ("latents", "proj_in.weight", "proj_out.weight", "norm_out.weight", "layers.0.0.to_kv.weight")


class IdProjection(nn.Module):
    """ArcFace embedding [B, 1, 512] (or [B, k, 512]) -> identity tokens [B, N, output_dim]."""

    def __init__(self, dim: int = 1280, depth: int = 4, dim_head: int = 64, heads: int = 20, num_queries: int = 8,
                 embedding_dim: int = 512, output_dim: int = 4096, ff_mult: int = 4):
        super().__init__()
        self.latents = nn.Parameter(torch.zeros(1, num_queries, dim))
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([
                PerceiverAttention(dim, dim_head=dim_head, heads=heads),
                feed_forward(dim, ff_mult),
            ]) for _ in range(depth))

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        latents = self.latents.repeat(embedding.shape[0], 1, 1)
        features = self.proj_in(embedding)
        for attention, feed_forward in self.layers:
            latents = attention(features, latents) + latents
            latents = feed_forward(latents) + latents
        return self.norm_out(self.proj_out(latents))


def detect(keys: Iterable[str]) -> bool:
    """An InfiniteYou image_proj state (after taking its "image_proj" entry)."""
    keys = set(keys)
    return all(k in keys for k in PREFIX_KEYS) and "layers.0.1.1.weight" in keys


def sizes(state: Mapping[str, torch.Tensor], dim_head: int = 64) -> dict[str, int]:
    """The constructor arguments, read from the tensors' shapes."""
    _, num_queries, dim = state["latents"].shape
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("layers."))
    inner = state["layers.0.0.to_q.weight"].shape[0]
    return {"dim": dim, "depth": depth, "dim_head": dim_head, "heads": inner // dim_head, "num_queries": num_queries,
            "embedding_dim": state["proj_in.weight"].shape[1], "output_dim": state["proj_out.weight"].shape[0],
            "ff_mult": state["layers.0.1.1.weight"].shape[0] // dim}


def build(state: Mapping[str, torch.Tensor], dim_head: int | None = None) -> IdProjection:
    """An IdProjection holding `state` (a checkpoint's "image_proj" dict). `dim_head` is not in
    the shapes: 64 in the release; a state whose inner width is not a multiple uses one head."""
    if not detect(state.keys()):
        raise ValueError("not an InfiniteYou image_proj state dict (missing Resampler keys)")
    inner = state["layers.0.0.to_q.weight"].shape[0]
    dim_head = dim_head or (64 if inner % 64 == 0 else inner)
    model = IdProjection(**sizes(state, dim_head))
    model.load_state_dict(dict(state), strict=True)
    return model.eval()


def _projection(source):
    """InfiniteYou's identity projection (image_proj_model.bin's "image_proj" Resampler), hash-checked
    and read weights-only; sizes from the tensors (portrait/core/archs/infiniteyou.py)."""
    state = source.weights()
    proj = state.get("image_proj") if isinstance(state, dict) else None
    if proj is None or not detect(proj.keys()):
        raise BadInput(f"{source.path}: not an InfiniteYou image_proj_model.bin (no Resampler 'image_proj')")
    return build(proj)


PROJECTION = Kind("infiniteyou-projection", _projection, place=True, detect=detect)
