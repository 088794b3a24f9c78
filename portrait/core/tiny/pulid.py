"""make-tiny makers for PuLID (SDXL v1.1) and EVA02-CLIP-L-14-336, in their real layouts.

- `pulid_v1.1.safetensors`: one flat safetensors file, `id_adapter.*` (IDFormer) and
  `id_adapter_attn_layers.{i}.id_to_k/id_to_v.weight` for every cross-attention processor i
  of the tiny SDXL UNet (the reference numbers all processors, self-attention included).
  Tiny sizes: width 64 (one head of 64), depth 5 (one layer per EVA scale, the minimum),
  4 queries, 5 ID tokens per photo (as the real one), output = the tiny UNet's
  cross-attention width; the ID vector is antelopev2's 512 ++ the tiny EVA's embedding.
- `EVA02_CLIP_L_336_psz14_s6B.pt`: a torch.save'd state dict with EVA-CLIP's own visual key
  names (`visual.blocks.{i}.attn.q_proj/k_proj/v_proj`, `q_bias`, `v_bias`,
  `attn.inner_attn_ln`, `mlp.w1/w2/w3`, `mlp.ffn_ln`, `visual.head`), which timm's
  `checkpoint_filter_fn` converts on load exactly as it converts the real file. Tiny:
  width 64, the real depth 24 (PuLID taps blocks 4-20), patch 14, 56 px input.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .adapters import SeededInit, save_bin, tiny_unet_config, unet_layout
from .faces import EMBEDDING_DIM

EVA_TINY = {"width": 64, "depth": 24, "patch": 14, "image": 56, "mlp": 128, "embed": 32}
IDFORMER_TINY = {"dim": 64, "depth": 5, "inner": 64, "queries": 4, "id_tokens": 5, "map": 64, "ff_mult": 4}

# timm Eva name -> EVA-CLIP name (the inverse of timm's checkpoint_filter_fn renames)
_TO_EVA_CLIP = (("attn.norm.", "attn.inner_attn_ln."), ("mlp.norm.", "mlp.ffn_ln."), ("mlp.fc1_g.", "mlp.w1."),
                ("mlp.fc1_x.", "mlp.w2."), ("mlp.fc2.", "mlp.w3."), ("attn.q_proj.bias", "attn.q_bias"),
                ("attn.v_proj.bias", "attn.v_bias"))


def eva_tiny_state(seed: int) -> dict[str, torch.Tensor]:
    from timm.models.eva import Eva

    c = EVA_TINY
    torch.manual_seed(seed)
    grid = c["image"] // c["patch"]
    trunk = Eva(img_size=c["image"], patch_size=c["patch"], embed_dim=c["width"], depth=c["depth"], num_heads=1,
                mlp_ratio=c["mlp"] / c["width"], qkv_fused=False, swiglu_mlp=True, scale_mlp=True,
                scale_attn_inner=True, use_rot_pos_emb=True, ref_feat_shape=(grid, grid), global_pool="token",
                num_classes=c["embed"])
    init = SeededInit(seed)
    state = {}
    for name, value in trunk.state_dict().items():
        if "rope" in name:
            continue
        if value.ndim >= 2 or name in ("cls_token", "pos_embed"):
            value = init.w(*value.shape, std=0.1 if value.ndim < 4 else None)
        elif name.endswith("weight"):
            value = 1.0 + init.b(value.shape[0])
        else:
            value = init.b(value.shape[0])
        for timm_name, eva_name in _TO_EVA_CLIP:
            name = name.replace(timm_name, eva_name)
        state[f"visual.{name}"] = value.contiguous()
    return state


def write_eva_clip(root: Path, seed: int) -> None:
    save_bin(root / "EVA02_CLIP_L_336_psz14_s6B.pt", eva_tiny_state(seed))


def pulid_tiny_state(seed: int) -> dict[str, torch.Tensor]:
    c = IDFORMER_TINY
    init = SeededInit(seed)
    layout = unet_layout(tiny_unet_config("sdxl"))
    out = layout.cross_attention_dim
    dim, inner, m = c["dim"], c["inner"], c["map"]
    sd: dict[str, torch.Tensor] = {"latents": init.w(1, c["queries"], dim, std=dim ** -0.5),
                                   "proj_out": init.w(dim, out, std=dim ** -0.5)}
    for layer in range(c["depth"]):
        p = f"layers.{layer}"
        sd.update(init.ln(f"{p}.0.norm1", dim))
        sd.update(init.ln(f"{p}.0.norm2", dim))
        sd.update(init.linear(f"{p}.0.to_q", inner, dim, bias=False))
        sd.update(init.linear(f"{p}.0.to_kv", inner * 2, dim, bias=False))
        sd.update(init.linear(f"{p}.0.to_out", dim, inner, bias=False))
        sd.update(init.ln(f"{p}.1.0", dim))
        sd.update(init.linear(f"{p}.1.1", dim * c["ff_mult"], dim, bias=False))
        sd.update(init.linear(f"{p}.1.3", dim, dim * c["ff_mult"], bias=False))

    def mlp(prefix: str, inp: int, last: int) -> None:
        sd.update(init.linear(f"{prefix}.0", m, inp))
        sd.update(init.ln(f"{prefix}.1", m))
        sd.update(init.linear(f"{prefix}.3", m, m))
        sd.update(init.ln(f"{prefix}.4", m))
        sd.update(init.linear(f"{prefix}.6", last, m))

    for i in range(5):
        mlp(f"mapping_{i}", EVA_TINY["width"], dim)
    mlp("id_embedding_mapping", EMBEDDING_DIM + EVA_TINY["embed"], dim * c["id_tokens"])
    state = {f"id_adapter.{k}": v.contiguous() for k, v in sd.items()}
    for index, proc in enumerate(layout.processors):
        if proc.cross:
            for name in ("id_to_k", "id_to_v"):
                state[f"id_adapter_attn_layers.{index}.{name}.weight"] = init.w(proc.hidden, out).contiguous()
    return state


def write_pulid_sdxl(root: Path, seed: int) -> None:
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    save_file(pulid_tiny_state(seed), str(root / "pulid_v1.1.safetensors"))


# --- PuLID-FLUX ----------------------------------------------------------------------------------------

CA_TINY = {"inner": 128, "kv_dim": 64}  # one head of 128 (the real: 16 heads of 128, kv 2048, dim 3072)


def pulid_flux_tiny_state(seed: int) -> dict[str, torch.Tensor]:
    """`pulid_encoder.*` + `pulid_ca.{k}.*` for tiny-flux's transformer (2 double, 4 single blocks -> 2 modules)."""
    from ..archs.pulid import flux_ca_count
    from .flux import TINY_FLUX

    init = SeededInit(seed)
    c, kv = IDFORMER_TINY, CA_TINY["kv_dim"]
    encoder = pulid_tiny_state(seed)  # the IDFormer part, re-drawn at output width kv below
    encoder = {k[len("id_adapter."):]: v for k, v in encoder.items() if k.startswith("id_adapter.")}
    encoder["proj_out"] = init.w(c["dim"], kv, std=c["dim"] ** -0.5)
    state = {f"pulid_encoder.{k}": v.contiguous() for k, v in encoder.items()}
    dim = TINY_FLUX["num_attention_heads"] * TINY_FLUX["attention_head_dim"]
    inner = CA_TINY["inner"]
    for k in range(flux_ca_count(TINY_FLUX["num_layers"], TINY_FLUX["num_single_layers"])):
        p = f"pulid_ca.{k}"
        block = {}
        block.update(init.ln(f"{p}.norm1", kv))
        block.update(init.ln(f"{p}.norm2", dim))
        block.update(init.linear(f"{p}.to_q", inner, dim, bias=False))
        block.update(init.linear(f"{p}.to_kv", inner * 2, kv, bias=False))
        block.update(init.linear(f"{p}.to_out", dim, inner, bias=False))
        state.update({name: v.contiguous() for name, v in block.items()})
    return state


def write_pulid_flux(root: Path, seed: int) -> None:
    from safetensors.torch import save_file

    root.mkdir(parents=True, exist_ok=True)
    save_file(pulid_flux_tiny_state(seed), str(root / "pulid_flux_v0.9.1.safetensors"))
