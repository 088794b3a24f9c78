"""IP-Adapter-Plus's perceiver blocks, shared by PuLID's IDFormer and InfiniteYou's projection.

Both checkpoints use open_flamingo's / IP-Adapter-Plus's layout for a resampler layer: a
`PerceiverAttention` (`norm1` on the context, `norm2` on the latents, bias-free `to_q`, `to_kv`
over [context; latents], `to_out`) and a feed-forward `LayerNorm, Linear, GELU, Linear`
(bias-free). The reference code scales q and k by dim_head ** -0.25 each before the product
(fp16 range) and takes the softmax in fp32; `split_scale_attention` does the same, so low
precision runs agree with it. PhotoMaker keeps its own attention (fp32 SDPA, bit-identical to
its reference), and PuLID-FLUX's cross-attention reuses `split_scale_attention`.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def split_scale_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, dim_head: int) -> torch.Tensor:
    """[b, n, heads*dim_head] queries against [b, m, heads*dim_head] keys/values -> [b, n, heads*dim_head]."""
    b, n, _ = q.shape
    q, k, v = (t.view(b, t.shape[1], heads, dim_head).transpose(1, 2) for t in (q, k, v))
    s = 1.0 / math.sqrt(math.sqrt(dim_head))  # the reference's expression (not dim_head ** -0.25: 1 ulp apart)
    weights = torch.softmax(((q * s) @ (k * s).transpose(-2, -1)).float(), dim=-1).to(q.dtype)
    return (weights @ v).transpose(1, 2).reshape(b, n, -1)


class PerceiverAttention(nn.Module):
    """Latents attend to [context ++ latents]. `kv_dim`: the context's width when it differs
    from the latents' (PuLID-FLUX's cross-attention, a subclass)."""

    def __init__(self, dim: int, dim_head: int, heads: int, kv_dim: int | None = None):
        super().__init__()
        inner, kv_dim = heads * dim_head, kv_dim or dim
        self.heads, self.dim_head = heads, dim_head
        self.norm1 = nn.LayerNorm(kv_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(kv_dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, context: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        context, latents = self.norm1(context), self.norm2(latents)
        k, v = self.to_kv(torch.cat([context, latents], dim=1)).chunk(2, dim=-1)
        return self.to_out(split_scale_attention(self.to_q(latents), k, v, self.heads, self.dim_head))


def feed_forward(dim: int, mult: int) -> nn.Sequential:
    """The resampler layer's MLP: LayerNorm, Linear (x mult), GELU, Linear; bias-free."""
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(),
                         nn.Linear(dim * mult, dim, bias=False))
