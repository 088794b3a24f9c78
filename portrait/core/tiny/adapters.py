"""make-tiny makers for the zero-shot identity adapters, in their real on-disk layouts.

Every file has the real file name, the real container (torch.save pickle of nested dicts,
safetensors, a transformers folder) and the real key names, at tiny sizes matched to the
tiny SD1.5 / SDXL UNets (docs/ARCHITECTURE.md#adapter-formats):

- InstantID `ip-adapter.bin`: {"image_proj": Resampler (latents, proj_in, proj_out, norm_out,
  layers.{0..3}.0.{norm1,norm2,to_q,to_kv,to_out}, layers.l.1.{0,1,3}),
  "ip_adapter": {i}.to_k_ip/to_v_ip for every cross-attention processor i (odd)}.
- IP-Adapter FaceID / FaceID-PlusV2 `.bin` (+ the LoRA part again as a kohya
  `_lora.safetensors`, as h94 ships it for A1111/ComfyUI).
- CLIP ViT-H image encoder folder `models/image_encoder/` (CLIPVisionModelWithProjection).
- PhotoMaker v1 / v2 `.bin`: keys exactly `id_encoder`, `lora_weights`, in that order.

Sizes: diffusers' Resampler loaders assume a head size of 64 and 4 layers, so attention
inner widths are multiples of 64 (PhotoMaker v2's perceiver uses heads of 128); FaceID-Plus
keeps its perceiver at the UNet's cross-attention width, as the real files do. The ID embedding stays 512, the
size of the tiny ArcFace packs' output (portrait.core.tiny.faces.EMBEDDING_DIM).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .faces import EMBEDDING_DIM

ID_DIM = EMBEDDING_DIM
RESAMPLER_DIM = 64  # a multiple of 64: diffusers derives the head count as width // 64
RESAMPLER_DEPTH = 4  # diffusers' key conversion handles exactly layers 0..3
INSTANTID_TOKENS = 16
FACEID_TOKENS = 4
LORA_RANK = 4
CLIP_H = dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_hidden_layers=2, patch_size=32,
              image_size=224, projection_dim=32, hidden_act="gelu")
# PhotoMaker's own CLIP ViT-L: quick_gelu and head size 64 like the real one (1024 / 16).
CLIP_L = dict(hidden_size=64, intermediate_size=128, num_attention_heads=1, num_hidden_layers=2, patch_size=32,
              image_size=224, hidden_act="quick_gelu")
PHOTOMAKER_V2_HEAD = 128
PHOTOMAKER_V2_TOKENS = 2


# --- UNet layout --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Processor:
    name: str  # e.g. down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor
    hidden: int
    cross: bool


@dataclass(frozen=True)
class UnetLayout:
    cross_attention_dim: int
    processors: tuple[Processor, ...]  # in unet.attn_processors order (the adapters' numbering)


def unet_layout(unet_config: dict) -> UnetLayout:
    """The attention processors of a UNet built from `unet_config`, in `attn_processors` order."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
    channels = list(unet.config.block_out_channels)
    rows = []
    for name in unet.attn_processors:
        if name.startswith("mid_block"):
            hidden = channels[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(channels))[int(name.split(".")[1])]
        else:
            hidden = channels[int(name.split(".")[1])]
        rows.append(Processor(name, hidden, cross=not name.endswith("attn1.processor")))
    cad = unet.config.cross_attention_dim
    return UnetLayout(int(cad if isinstance(cad, int) else cad[0]), tuple(rows))


def tiny_unet_config(family: str) -> dict:
    """The config of the tiny base's UNet (portrait.core.tiny.diffusion builds it)."""
    from . import diffusion

    parts = diffusion.sdxl_parts(0) if family == "sdxl" else diffusion.sd15_parts(0)
    return dict(parts["unet"].config)


def tiny_text_dims() -> tuple[int, int]:
    """(text_encoder hidden, text_encoder_2 hidden) of the tiny SDXL: PhotoMaker's projections."""
    from .diffusion import TINY_SDXL

    return int(TINY_SDXL["text_hidden_size"]), int(TINY_SDXL["text_2_hidden_size"])


# --- tensors --------------------------------------------------------------------------------------


class SeededInit:
    """Deterministic small random tensors (same seed -> same bytes)."""

    def __init__(self, seed: int):
        self.gen = torch.Generator().manual_seed(seed)

    def w(self, *shape: int, std: float | None = None) -> torch.Tensor:
        std = std if std is not None else 1.0 / max(1, shape[-1]) ** 0.5
        return (torch.randn(*shape, generator=self.gen) * std).contiguous()

    def b(self, n: int) -> torch.Tensor:
        return (torch.randn(n, generator=self.gen) * 0.02).contiguous()

    def ln(self, prefix: str, n: int) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": 1.0 + self.b(n), f"{prefix}.bias": self.b(n)}

    def linear(self, prefix: str, out: int, inp: int, bias: bool = True) -> dict[str, torch.Tensor]:
        row = {f"{prefix}.weight": self.w(out, inp)}
        if bias:
            row[f"{prefix}.bias"] = self.b(out)
        return row


def perceiver_layers(init: SeededInit, prefix: str, dim: int, inner: int, depth: int = RESAMPLER_DEPTH,
                     ff_mult: int = 4) -> dict[str, torch.Tensor]:
    """IP-Adapter's PerceiverAttention + FeedForward blocks, in the original key layout."""
    sd: dict[str, torch.Tensor] = {}
    for layer in range(depth):
        p = f"{prefix}layers.{layer}"
        sd.update(init.ln(f"{p}.0.norm1", dim))
        sd.update(init.ln(f"{p}.0.norm2", dim))
        sd.update(init.linear(f"{p}.0.to_q", inner, dim, bias=False))
        sd.update(init.linear(f"{p}.0.to_kv", 2 * inner, dim, bias=False))
        sd.update(init.linear(f"{p}.0.to_out", dim, inner, bias=False))
        sd.update(init.ln(f"{p}.1.0", dim))
        sd.update(init.linear(f"{p}.1.1", dim * ff_mult, dim, bias=False))
        sd.update(init.linear(f"{p}.1.3", dim, dim * ff_mult, bias=False))
    return sd


def ip_layers(init: SeededInit, layout: UnetLayout, lora_rank: int | None = None) -> dict[str, torch.Tensor]:
    """`ip_adapter`: to_k_ip/to_v_ip on cross-attention processors, numbered over all processors
    in attn_processors order (so cross-attention gets the odd numbers); FaceID adds a LoRA on all."""
    sd: dict[str, torch.Tensor] = {}
    cad = layout.cross_attention_dim
    for i, proc in enumerate(layout.processors):
        if lora_rank:
            kv_in = cad if proc.cross else proc.hidden
            for proj, inp in (("to_q", proc.hidden), ("to_k", kv_in), ("to_v", kv_in), ("to_out", proc.hidden)):
                sd[f"{i}.{proj}_lora.down.weight"] = init.w(lora_rank, inp)
                sd[f"{i}.{proj}_lora.up.weight"] = init.w(proc.hidden, lora_rank, std=0.02)
        if proc.cross:
            sd[f"{i}.to_k_ip.weight"] = init.w(proc.hidden, cad)
            sd[f"{i}.to_v_ip.weight"] = init.w(proc.hidden, cad)
    return sd


def kohya_lora(ip_adapter: dict[str, torch.Tensor], layout: UnetLayout) -> dict[str, torch.Tensor]:
    """The FaceID LoRA as A1111/ComfyUI read it (`lora_unet_..._to_q.lora_down.weight` + alpha)."""
    out: dict[str, torch.Tensor] = {}
    for i, proc in enumerate(layout.processors):
        module = proc.name[: -len(".processor")].replace(".", "_")
        for proj, kohya in (("to_q", "to_q"), ("to_k", "to_k"), ("to_v", "to_v"), ("to_out", "to_out_0")):
            down = ip_adapter.get(f"{i}.{proj}_lora.down.weight")
            if down is None:
                continue
            key = f"lora_unet_{module}_{kohya}"
            out[f"{key}.lora_down.weight"] = down.clone()
            out[f"{key}.lora_up.weight"] = ip_adapter[f"{i}.{proj}_lora.up.weight"].clone()
            out[f"{key}.alpha"] = torch.tensor(float(down.shape[0]))
    return out


# --- InstantID ------------------------------------------------------------------------------------


def instantid_state(seed: int, layout: UnetLayout) -> dict[str, dict[str, torch.Tensor]]:
    init = SeededInit(seed)
    dim, out = RESAMPLER_DIM, layout.cross_attention_dim
    proj = {"latents": init.w(1, INSTANTID_TOKENS, dim, std=dim ** -0.5)}
    proj.update(init.linear("proj_in", dim, ID_DIM))
    proj.update(init.linear("proj_out", out, dim))
    proj.update(init.ln("norm_out", out))
    proj.update(perceiver_layers(init, "", dim, inner=dim))
    return {"image_proj": proj, "ip_adapter": ip_layers(init, layout)}


def write_instantid_adapter(root: Path, seed: int) -> None:
    save_bin(root / "ip-adapter.bin", instantid_state(seed, unet_layout(tiny_unet_config("sdxl"))))


# --- IP-Adapter FaceID ------------------------------------------------------------------------------


def faceid_state(seed: int, layout: UnetLayout, plus: bool) -> dict[str, dict[str, torch.Tensor]]:
    init = SeededInit(seed)
    cad = layout.cross_attention_dim
    width = cad  # Plus: the perceiver runs at the UNet's width; PlusV2's shortcut adds the two
    inner = 64 * max(1, cad // 64)  # diffusers reads heads as to_q rows // 64
    proj = {}
    proj.update(init.linear("proj.0", ID_DIM * 2, ID_DIM))
    proj.update(init.linear("proj.2", width * FACEID_TOKENS, ID_DIM * 2))
    proj.update(init.ln("norm", width))
    if plus:
        p = "perceiver_resampler."
        proj.update(init.linear(f"{p}proj_in", width, CLIP_H["hidden_size"]))
        proj.update(init.linear(f"{p}proj_out", cad, width))
        proj.update(init.ln(f"{p}norm_out", cad))
        proj.update(perceiver_layers(init, p, width, inner=inner))
    return {"image_proj": proj, "ip_adapter": ip_layers(init, layout, lora_rank=LORA_RANK)}


def _write_faceid(root: Path, seed: int, family: str, plus: bool, stem_tag: str | None = None) -> None:
    from safetensors.torch import save_file

    layout = unet_layout(tiny_unet_config(family))
    state = faceid_state(seed, layout, plus)
    tag = stem_tag if stem_tag is not None else ("-plusv2" if plus else "")
    stem = f"ip-adapter-faceid{tag}_{family}"
    save_bin(root / f"{stem}.bin", state)
    save_file(kohya_lora(state["ip_adapter"], layout), str(root / f"{stem}_lora.safetensors"))


def write_faceid_sd15(root: Path, seed: int) -> None:
    _write_faceid(root, seed, "sd15", plus=False)


def write_faceid_plus_sd15(root: Path, seed: int) -> None:
    """FaceID-Plus v1: the same state-dict layout as PlusV2 (v2 only adds the shortcut at inference)."""
    _write_faceid(root, seed, "sd15", plus=True, stem_tag="-plus")


def write_faceid_plusv2_sd15(root: Path, seed: int) -> None:
    _write_faceid(root, seed, "sd15", plus=True)


def write_faceid_sdxl(root: Path, seed: int) -> None:
    _write_faceid(root, seed, "sdxl", plus=False)


def write_faceid_plusv2_sdxl(root: Path, seed: int) -> None:
    _write_faceid(root, seed, "sdxl", plus=True)


def write_clip_vit_h(root: Path, seed: int) -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_H)).eval()
    model.save_pretrained(root / "models" / "image_encoder", safe_serialization=True)


# --- PhotoMaker -------------------------------------------------------------------------------------


def clip_l_state(seed: int, projection_dim: int) -> dict[str, torch.Tensor]:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_L, projection_dim=projection_dim))
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def photomaker_state(seed: int, version: int) -> dict[str, dict[str, torch.Tensor]]:
    te1, te2 = tiny_text_dims()
    dim = te1 + te2  # the fused token lives in the UNet's text space (2048 in SDXL)
    init = SeededInit(seed)
    enc = clip_l_state(seed, projection_dim=te1)
    hidden = CLIP_L["hidden_size"]
    enc.update(init.linear("visual_projection_2", te2, hidden, bias=False))
    enc.update(_mlp(init, "fuse_module.mlp1", 2 * dim, dim, dim))
    enc.update(_mlp(init, "fuse_module.mlp2", dim, dim, dim))
    enc.update(init.ln("fuse_module.layer_norm", dim))
    if version == 2:
        q = "qformer_perceiver."
        enc.update(init.linear(f"{q}token_proj.0", ID_DIM * 4, ID_DIM))
        enc.update(init.linear(f"{q}token_proj.2", dim * PHOTOMAKER_V2_TOKENS, ID_DIM * 4))
        enc.update(init.ln(f"{q}token_norm", dim))
        p = f"{q}perceiver_resampler."
        inner = PHOTOMAKER_V2_HEAD * max(1, dim // PHOTOMAKER_V2_HEAD)
        enc.update(init.linear(f"{p}proj_in", dim, hidden))
        enc.update(init.linear(f"{p}proj_out", dim, dim))
        enc.update(init.ln(f"{p}norm_out", dim))
        enc.update(perceiver_layers(init, p, dim, inner=inner))
    return {"id_encoder": enc, "lora_weights": photomaker_lora(init, unet_layout(tiny_unet_config("sdxl")))}


def _mlp(init: SeededInit, prefix: str, inp: int, out: int, hidden: int) -> dict[str, torch.Tensor]:
    sd = init.ln(f"{prefix}.layernorm", inp)
    sd.update(init.linear(f"{prefix}.fc1", hidden, inp))
    sd.update(init.linear(f"{prefix}.fc2", out, hidden))
    return sd


def photomaker_lora(init: SeededInit, layout: UnetLayout) -> dict[str, torch.Tensor]:
    """PhotoMaker's LoRA in the old diffusers processor layout (`unet.<proc>.to_q_lora.down.weight`)."""
    sd: dict[str, torch.Tensor] = {}
    cad = layout.cross_attention_dim
    for proc in layout.processors:
        kv_in = cad if proc.cross else proc.hidden
        for proj, inp in (("to_q", proc.hidden), ("to_k", kv_in), ("to_v", kv_in), ("to_out", proc.hidden)):
            sd[f"unet.{proc.name}.{proj}_lora.down.weight"] = init.w(LORA_RANK, inp)
            sd[f"unet.{proc.name}.{proj}_lora.up.weight"] = init.w(proc.hidden, LORA_RANK, std=0.02)
    return sd


def write_photomaker_v1(root: Path, seed: int) -> None:
    save_bin(root / "photomaker-v1.bin", photomaker_state(seed, 1))


def write_photomaker_v2(root: Path, seed: int) -> None:
    save_bin(root / "photomaker-v2.bin", photomaker_state(seed, 2))


# --- files ------------------------------------------------------------------------------------------


def save_bin(path: Path, state: dict) -> None:
    """torch.save as the originals are; the zip container records no time, so bytes repeat."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        torch.save(state, fh)
