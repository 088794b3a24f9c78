"""Diffusers -> original (A1111 / LDM / SGM) key layout, for the single-file tiny stand-ins.

Real single-file checkpoints (`v1-5-pruned-emaonly.safetensors`, `sd_xl_base_1.0.safetensors`,
ControlNet-v1-1 files) use the original CompVis / Stability key names. diffusers only ships
the original -> diffusers direction (`from_single_file`), so to write a tiny file in the real
layout we invert it here, block by block. A test loads the result with `from_single_file`
and compares outputs with the diffusers-format model built from the same weights, so any
key this gets wrong shows up as a load error or a different image.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD15_CLIP_PREFIX = "cond_stage_model.transformer.text_model."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer.text_model."
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."

_FIXED_UNET = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
           ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))


def _resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return dict(_RESNET).get(head, head) + "." + tail


def _split_param(key: str) -> tuple[str, str]:
    module, _, param = key.rpartition(".")
    return module, param


def unet_key(key: str, config: Mapping[str, Any]) -> str | None:
    """One diffusers UNet (or ControlNet trunk) key in LDM naming; None if it has no LDM twin."""
    per = int(config["layers_per_block"]) + 1  # resnets per down block, plus its downsampler slot
    module, param = _split_param(key)
    if module in _FIXED_UNET:
        return f"{_FIXED_UNET[module]}.{param}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, part, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        slot = 1 + block * per + layer
        return f"input_blocks.{slot}.0.{_resnet(rest)}" if part == "resnets" else f"input_blocks.{slot}.1.{rest}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", key):
        return f"input_blocks.{1 + int(m[1]) * per + per - 1}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_resnet(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, part, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        slot = block * per + layer
        return f"output_blocks.{slot}.0.{_resnet(rest)}" if part == "resnets" else f"output_blocks.{slot}.1.{rest}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", key):
        block = int(m[1])
        # The upsampler sits after the attention when the up block has one.
        has_attention = "CrossAttn" in config["up_block_types"][block]
        return f"output_blocks.{block * per + per - 1}.{2 if has_attention else 1}.conv.{m[2]}"
    return None


def unet_to_ldm(state: Mapping[str, torch.Tensor], config: Mapping[str, Any], prefix: str = UNET_PREFIX) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        mapped = unet_key(key, config)
        if mapped is None:
            raise KeyError(f"no LDM name for UNet key {key}")
        out[prefix + mapped] = value
    return out


def controlnet_to_ldm(state: Mapping[str, torch.Tensor], config: Mapping[str, Any], prefix: str = "") -> dict[str, torch.Tensor]:
    """ControlNet-v1-1 layout: the trunk as a UNet encoder plus hint block and zero convs.

    diffusers reads the hint block's last conv from index 14 whatever the depth (the real
    one has 7 convs with SiLUs between), and the intermediate convs from 2, 4, ...
    """
    out = {}
    for key, value in state.items():
        module, param = _split_param(key)
        if m := re.fullmatch(r"controlnet_down_blocks\.(\d+)", module):
            mapped = f"zero_convs.{m[1]}.0.{param}"
        elif module == "controlnet_mid_block":
            mapped = f"middle_block_out.0.{param}"
        elif module == "controlnet_cond_embedding.conv_in":
            mapped = f"input_hint_block.0.{param}"
        elif module == "controlnet_cond_embedding.conv_out":
            mapped = f"input_hint_block.14.{param}"
        elif m := re.fullmatch(r"controlnet_cond_embedding\.blocks\.(\d+)", module):
            mapped = f"input_hint_block.{2 * (int(m[1]) + 1)}.{param}"
        else:
            mapped = unet_key(key, config)
        if mapped is None:
            raise KeyError(f"no LDM name for ControlNet key {key}")
        out[prefix + mapped] = value
    return out


_VAE_FIXED = {"conv_norm_out": "norm_out"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _vae_resnet(rest: str) -> str:
    return rest.replace("conv_shortcut", "nin_shortcut")


def vae_key(key: str, n_up: int) -> str:
    side, _, rest = key.partition(".")
    if side not in ("encoder", "decoder"):
        return key  # quant_conv, post_quant_conv
    module, param = _split_param(rest)
    if module in _VAE_FIXED:
        return f"{side}.{_VAE_FIXED[module]}.{param}"
    if m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest):
        # diffusers counts decoder up blocks from the bottom; LDM counts them from the top.
        index = int(m[2]) if m[1] == "down" else n_up - 1 - int(m[2])
        return f"{side}.{m[1]}.{index}.block.{m[3]}.{_vae_resnet(m[4])}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", rest):
        return f"{side}.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(\w+)", rest):
        return f"{side}.up.{n_up - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", rest):
        return f"{side}.mid.block_{int(m[1]) + 1}.{_vae_resnet(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)\.(weight|bias)", rest):
        return f"{side}.mid.attn_1.{_VAE_ATTN[m[1]]}.{m[2]}"
    return f"{side}.{rest}"


def vae_to_ldm(state: Mapping[str, torch.Tensor], config: Mapping[str, Any], prefix: str = VAE_PREFIX) -> dict[str, torch.Tensor]:
    n_up = len(config["up_block_types"])
    out = {}
    for key, value in state.items():
        mapped = vae_key(key, n_up)
        # LDM's VAE attention projections are 1x1 convolutions, diffusers' are linear layers.
        if ".mid.attn_1." in mapped and mapped.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]
        out[prefix + mapped] = value
    return out


def clip_to_ldm(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModel in the HF layout the original checkpoints embed.

    transformers >= 5.6 dropped CLIPTextModel's `text_model.` wrapper; checkpoints keep it.
    """
    out = {}
    for key, value in state.items():
        out[prefix + key.removeprefix("text_model.")] = value
    return out


def openclip_to_ldm(state: Mapping[str, torch.Tensor], prefix: str = SDXL_OPENCLIP_PREFIX) -> dict[str, torch.Tensor]:
    """CLIPTextModelWithProjection -> OpenCLIP naming (SDXL's second text encoder).

    OpenCLIP fuses q, k, v into one `in_proj` and stores `text_projection` transposed.
    """
    flat = {k.removeprefix("text_model."): v for k, v in state.items()}
    out: dict[str, torch.Tensor] = {}
    names = {
        "embeddings.token_embedding.weight": "token_embedding.weight",
        "embeddings.position_embedding.weight": "positional_embedding",
        "final_layer_norm.weight": "ln_final.weight",
        "final_layer_norm.bias": "ln_final.bias",
    }
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        if key in names:
            out[prefix + names[key]] = value
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", key):
            layers.setdefault(int(m[1]), {})[m[2]] = value
        elif key.endswith("position_ids"):
            continue
        else:
            raise KeyError(f"no OpenCLIP name for text encoder key {key}")
    rename = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
              "self_attn.out_proj": "attn.out_proj"}
    for index, params in sorted(layers.items()):
        block = f"{prefix}transformer.resblocks.{index}."
        for kind in ("weight", "bias"):
            out[block + f"attn.in_proj_{kind}"] = torch.cat(
                [params.pop(f"self_attn.{p}_proj.{kind}") for p in ("q", "k", "v")], dim=0)
        for key, value in params.items():
            module, param = _split_param(key)
            out[block + f"{rename[module]}.{param}"] = value
    return out
