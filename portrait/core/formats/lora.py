"""LoRA files: safetensors read/write, and the two LoRA layouts the trainer publishes.

- the trainer's own layout (checkpoints): one flat safetensors file whose keys are
  `<component>.<peft key>` (`unet.down_blocks...lora_A.weight`), read back per component;
- diffusers' layout (`lora.safetensors` in a bundle): written by diffusers' `save_lora_weights`
  of the family's pipeline with the peft adapter config embedded, so `load_lora_weights`
  restores the real lora_alpha;
- the A1111 / ComfyUI layout (`lora_kohya.safetensors`), per family (docs/ARCHITECTURE.md#lora-files):
  SD1.5/SDXL in kohya's key names with `.alpha` = the real lora_alpha; FLUX.1 in kohya
  sd-scripts' names for BFL's modules (`lora_unet_double_blocks_0_img_attn_qkv`); FLUX.2
  [klein] in ComfyUI's `diffusion_model.<BFL module>.lora_A/B`; Z-Image in kohya names for
  diffusers' modules (`lora_unet_layers_0_attention_to_q`). Where BFL fuses projections that
  diffusers keeps apart (q/k/v; FLUX.1's single-block q/k/v/MLP) the fused LoRA stacks the
  parts' A matrices and puts their B matrices on a block diagonal: the same weight delta
  exactly, at the sum of the parts' ranks, the layout diffusers' converters recognise and split
  back.

Every writer is atomic: a temp file beside the target, fsynced, then renamed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

from portrait.core.io import atomic_path

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
TEXT_COMPONENTS = ("text_encoder", "text_encoder_2")
# The transformer modules diffusers' reference scripts put a LoRA on by default (their
# `target_modules` when --lora_layers is not given): train_dreambooth_lora_flux.py,
# train_dreambooth_lora_flux2_klein.py (double-block attention, the fused single-block
# projection and its output, for up to 24 single blocks) and train_dreambooth_lora_z_image.py.
TRANSFORMER_TARGETS: dict[str, tuple[str, ...]] = {
    "flux": ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
             "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
             "ff_context.net.2"),
    "flux2-klein": ("to_k", "to_q", "to_v", "to_out.0", "to_qkv_mlp_proj",
                    *(f"single_transformer_blocks.{i}.attn.to_out" for i in range(24))),
    "zimage": ("to_k", "to_q", "to_v", "to_out.0"),
}
# The diffusers pipeline whose LoRA loader reads each family's files.
PIPELINES = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline", "flux": "FluxPipeline",
             "flux2-klein": "Flux2KleinPipeline", "zimage": "ZImagePipeline"}

__all__ = [
    "write_safetensors", "read_safetensors", "flatten_state", "unflatten_state", "write_lora_file", "read_lora_file",
    "save_diffusers_lora", "kohya_state", "save_kohya_lora", "UNET_TARGETS", "TEXT_TARGETS", "TEXT_COMPONENTS",
    "TRANSFORMER_TARGETS", "PIPELINES", "lora_modules",
]


def write_safetensors(path: Path | str, state: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> Path:
    """A flat tensor dict as one safetensors file, atomically (tensors made contiguous)."""
    from safetensors.torch import save_file

    path = Path(path)
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp),
                  metadata=dict(metadata) if metadata is not None else None)
    return path


def read_safetensors(path: Path | str) -> dict[str, Any]:
    """Every tensor of a safetensors file, on the CPU."""
    from safetensors.torch import load_file

    return load_file(str(path))


def flatten_state(state: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """{component: {key: tensor}} -> {"component.key": tensor}."""
    return {f"{name}.{key}": value.contiguous() for name, part in state.items() for key, value in part.items()}


def unflatten_state(flat: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        name, rest = key.split(".", 1)
        out.setdefault(name, {})[rest] = value
    return out


def write_lora_file(path: Path | str, state: Mapping[str, Mapping[str, Any]]) -> Path:
    """The trainer's layout: per-component peft state dicts in one file."""
    return write_safetensors(path, flatten_state(state))


def read_lora_file(path: Path | str) -> dict[str, dict[str, Any]]:
    return unflatten_state(read_safetensors(path))


def _pipeline_class(family: str):
    import diffusers

    return getattr(diffusers, PIPELINES.get(family, "StableDiffusionPipeline"))


def _adapter_metadata(rank: int, alpha: float, targets: Sequence[str]) -> dict[str, Any]:
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets)).to_dict()


def save_diffusers_lora(path: Path, family: str, lora: Mapping[str, Mapping[str, Any]], rank: int, alpha: float,
                        unet_targets: Sequence[str] = UNET_TARGETS, text_targets: Sequence[str] = TEXT_TARGETS,
                        transformer_targets: Sequence[str] | None = None) -> Path:
    """diffusers' own writer (the family's pipeline's `save_lora_weights`) with the adapter config
    embedded, so `load_lora_weights` restores the real lora_alpha (without metadata it would
    assume alpha = rank)."""
    path = Path(path)
    if "transformer" in lora:
        targets = transformer_targets or TRANSFORMER_TARGETS[family]
        kwargs: dict[str, Any] = {"transformer_lora_layers": dict(lora["transformer"]),
                                  "transformer_lora_adapter_metadata": _adapter_metadata(rank, alpha, targets)}
    else:
        kwargs = {"unet_lora_layers": dict(lora["unet"]),
                  "unet_lora_adapter_metadata": _adapter_metadata(rank, alpha, unet_targets)}
    for name in TEXT_COMPONENTS:
        if name in lora:
            kwargs[f"{name}_lora_layers"] = dict(lora[name])
            kwargs[f"{name}_lora_adapter_metadata"] = _adapter_metadata(rank, alpha, text_targets)
    with atomic_path(path) as tmp:
        # diffusers writes into a folder under a name it chooses: a private folder beside the target
        folder = Path(tempfile.mkdtemp(prefix=".lora.", dir=path.parent))
        try:
            _pipeline_class(family).save_lora_weights(str(folder), weight_name="lora.safetensors", **kwargs)
            os.replace(folder / "lora.safetensors", tmp)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    return path


def kohya_state(lora: Mapping[str, Mapping[str, Any]], family: str, alpha: float) -> dict[str, Any]:
    """A1111 / ComfyUI key names, with `.alpha` = the real lora_alpha.

    diffusers' convert_state_dict_to_kohya writes alpha = rank and, with transformers 5
    (no `text_model` wrapper), text-encoder keys those tools do not recognise; both are fixed here.
    The flow-matching families have layouts of their own (see the module docstring).
    """
    import torch

    if "transformer" in lora:
        writer = {"flux": _flux_kohya, "flux2-klein": _flux2_comfy, "zimage": _zimage_kohya}.get(family)
        if writer is None:
            raise ValueError(f"no A1111/ComfyUI LoRA layout for family {family}")
        return writer(lora_modules(lora["transformer"]), float(alpha))
    from diffusers.utils import convert_state_dict_to_kohya

    flat = {f"{name}.{key}": value for name, part in lora.items() for key, value in part.items()}
    kohya = convert_state_dict_to_kohya(flat)
    te_prefix = {"lora_te1_": "lora_te_text_model_" if family != "sdxl" else "lora_te1_text_model_",
                 "lora_te2_": "lora_te2_text_model_"}
    out = {}
    for key, value in kohya.items():
        for old, new in te_prefix.items():
            if key.startswith(old) and not key.startswith(old + "text_model_"):
                key = new + key[len(old):]
                break
        if key.endswith(".alpha"):
            value = torch.tensor(float(alpha), dtype=torch.float32)
        out[key] = value.contiguous()
    return out


def save_kohya_lora(path: Path, family: str, lora: Mapping[str, Mapping[str, Any]], alpha: float,
                    metadata: Mapping[str, str] | None = None) -> Path:
    return write_safetensors(path, kohya_state(lora, family, alpha), dict(metadata or {}))


# --- the flow-matching families' A1111 / ComfyUI layouts -------------------------------------


def lora_modules(state: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """peft keys -> {module path: (A [r, in], B [out, r])}."""
    found: dict[str, dict[str, Any]] = {}
    for key, value in state.items():
        module, _, rest = key.rpartition(".lora_")
        found.setdefault(module, {})[rest.split(".", 1)[0]] = value
    return {module: (parts["A"], parts["B"]) for module, parts in found.items()}


def _fused(parts: Sequence[tuple[Any, Any] | None], out_dims: Sequence[int], scale_of) -> tuple[Any, Any]:
    """One LoRA for a fused projection from its parts' LoRAs: A stacked, B block-diagonal (a
    part without a LoRA gets zeros of the others' rank). up @ down equals, block by block, each
    part's scaled B @ A."""
    import torch

    present = [p for p in parts if p is not None]
    rank, width = present[0][0].shape
    downs, ups = [], []
    for part in parts:
        downs.append(part[0].float() if part is not None else torch.zeros(rank, width))
    total = sum(out_dims)
    up = torch.zeros(total, rank * len(parts))
    row = 0
    for j, (part, out) in enumerate(zip(parts, out_dims)):
        if part is not None:
            up[row:row + out, j * rank:(j + 1) * rank] = part[1].float() * scale_of(part)
        row += out
    return torch.cat(downs, 0), up


def _kohya_pair(out: dict[str, Any], name: str, down, up, alpha: float) -> None:
    import torch

    out[f"{name}.lora_down.weight"] = down.contiguous()
    out[f"{name}.lora_up.weight"] = up.contiguous()
    out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)


def _group(modules: Mapping[str, tuple[Any, Any]], rules) -> tuple[dict, dict, list[str]]:
    """Sort modules by regex rules into plain (name -> module) and fused (name -> {split: module})."""
    import re

    plain, fused, unknown = {}, {}, []
    for module in modules:
        for pattern, target, split, splits in rules:
            match = re.fullmatch(pattern, module)
            if match:
                name = target.format(*match.groups())
                if split is None:
                    plain[name] = module
                else:
                    fused.setdefault(name, [None] * splits)[split] = module
                break
        else:
            unknown.append(module)
    return plain, fused, unknown


_FLUX1_RULES = [  # (diffusers module, kohya name, split, splits) for FLUX.1 in BFL's layout
    (r"transformer_blocks\.(\d+)\.attn\.to_q", "lora_unet_double_blocks_{}_img_attn_qkv", 0, 3),
    (r"transformer_blocks\.(\d+)\.attn\.to_k", "lora_unet_double_blocks_{}_img_attn_qkv", 1, 3),
    (r"transformer_blocks\.(\d+)\.attn\.to_v", "lora_unet_double_blocks_{}_img_attn_qkv", 2, 3),
    (r"transformer_blocks\.(\d+)\.attn\.add_q_proj", "lora_unet_double_blocks_{}_txt_attn_qkv", 0, 3),
    (r"transformer_blocks\.(\d+)\.attn\.add_k_proj", "lora_unet_double_blocks_{}_txt_attn_qkv", 1, 3),
    (r"transformer_blocks\.(\d+)\.attn\.add_v_proj", "lora_unet_double_blocks_{}_txt_attn_qkv", 2, 3),
    (r"transformer_blocks\.(\d+)\.attn\.to_out\.0", "lora_unet_double_blocks_{}_img_attn_proj", None, 0),
    (r"transformer_blocks\.(\d+)\.attn\.to_add_out", "lora_unet_double_blocks_{}_txt_attn_proj", None, 0),
    (r"transformer_blocks\.(\d+)\.ff\.net\.0\.proj", "lora_unet_double_blocks_{}_img_mlp_0", None, 0),
    (r"transformer_blocks\.(\d+)\.ff\.net\.2", "lora_unet_double_blocks_{}_img_mlp_2", None, 0),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.0\.proj", "lora_unet_double_blocks_{}_txt_mlp_0", None, 0),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.2", "lora_unet_double_blocks_{}_txt_mlp_2", None, 0),
    (r"transformer_blocks\.(\d+)\.norm1\.linear", "lora_unet_double_blocks_{}_img_mod_lin", None, 0),
    (r"transformer_blocks\.(\d+)\.norm1_context\.linear", "lora_unet_double_blocks_{}_txt_mod_lin", None, 0),
    (r"single_transformer_blocks\.(\d+)\.attn\.to_q", "lora_unet_single_blocks_{}_linear1", 0, 4),
    (r"single_transformer_blocks\.(\d+)\.attn\.to_k", "lora_unet_single_blocks_{}_linear1", 1, 4),
    (r"single_transformer_blocks\.(\d+)\.attn\.to_v", "lora_unet_single_blocks_{}_linear1", 2, 4),
    (r"single_transformer_blocks\.(\d+)\.proj_mlp", "lora_unet_single_blocks_{}_linear1", 3, 4),
    (r"single_transformer_blocks\.(\d+)\.proj_out", "lora_unet_single_blocks_{}_linear2", None, 0),
    (r"single_transformer_blocks\.(\d+)\.norm\.linear", "lora_unet_single_blocks_{}_modulation_lin", None, 0),
]

_FLUX2_RULES = [  # FLUX.2 in ComfyUI's layout (diffusion_model.<BFL module>)
    (r"transformer_blocks\.(\d+)\.attn\.to_q", "diffusion_model.double_blocks.{}.img_attn.qkv", 0, 3),
    (r"transformer_blocks\.(\d+)\.attn\.to_k", "diffusion_model.double_blocks.{}.img_attn.qkv", 1, 3),
    (r"transformer_blocks\.(\d+)\.attn\.to_v", "diffusion_model.double_blocks.{}.img_attn.qkv", 2, 3),
    (r"transformer_blocks\.(\d+)\.attn\.add_q_proj", "diffusion_model.double_blocks.{}.txt_attn.qkv", 0, 3),
    (r"transformer_blocks\.(\d+)\.attn\.add_k_proj", "diffusion_model.double_blocks.{}.txt_attn.qkv", 1, 3),
    (r"transformer_blocks\.(\d+)\.attn\.add_v_proj", "diffusion_model.double_blocks.{}.txt_attn.qkv", 2, 3),
    (r"transformer_blocks\.(\d+)\.attn\.to_out\.0", "diffusion_model.double_blocks.{}.img_attn.proj", None, 0),
    (r"transformer_blocks\.(\d+)\.attn\.to_add_out", "diffusion_model.double_blocks.{}.txt_attn.proj", None, 0),
    (r"transformer_blocks\.(\d+)\.ff\.linear_in", "diffusion_model.double_blocks.{}.img_mlp.0", None, 0),
    (r"transformer_blocks\.(\d+)\.ff\.linear_out", "diffusion_model.double_blocks.{}.img_mlp.2", None, 0),
    (r"transformer_blocks\.(\d+)\.ff_context\.linear_in", "diffusion_model.double_blocks.{}.txt_mlp.0", None, 0),
    (r"transformer_blocks\.(\d+)\.ff_context\.linear_out", "diffusion_model.double_blocks.{}.txt_mlp.2", None, 0),
    (r"single_transformer_blocks\.(\d+)\.attn\.to_qkv_mlp_proj", "diffusion_model.single_blocks.{}.linear1", None, 0),
    (r"single_transformer_blocks\.(\d+)\.attn\.to_out", "diffusion_model.single_blocks.{}.linear2", None, 0),
]


def _refuse_unknown(family: str, unknown: Sequence[str]) -> None:
    if unknown:
        raise ValueError(f"no {family} A1111/ComfyUI key for LoRA module(s) {', '.join(sorted(unknown)[:3])}")


def _flux_kohya(modules: Mapping[str, tuple[Any, Any]], alpha: float) -> dict[str, Any]:
    """FLUX.1 in kohya sd-scripts' layout (what ComfyUI, Forge and sd-scripts read). The scale
    alpha/rank is folded into B and each `.alpha` written equal to its rank: a fused key's rank
    is the sum of its parts'."""
    plain, fused, unknown = _group(modules, _FLUX1_RULES)
    _refuse_unknown("flux", unknown)
    out: dict[str, Any] = {}
    scale_of = lambda part: alpha / part[0].shape[0]  # noqa: E731
    for name, module in plain.items():
        down, up = modules[module]
        _kohya_pair(out, name, down.float(), up.float() * scale_of(modules[module]), down.shape[0])
    for name, splits in fused.items():
        parts = [modules[m] if m else None for m in splits]
        present = next(p for p in parts if p is not None)
        width = present[1].shape[0]  # q, k, v share the inner width
        # FLUX.1's single blocks fuse q, k, v and the MLP input (mlp_ratio 4) into linear1.
        dims = [width] * 3 + ([modules[splits[3]][1].shape[0] if splits[3] else 4 * width] if len(parts) == 4 else [])
        down, up = _fused(parts, dims, scale_of)
        _kohya_pair(out, name, down, up, down.shape[0])
    return out


def _flux2_comfy(modules: Mapping[str, tuple[Any, Any]], alpha: float) -> dict[str, Any]:
    """FLUX.2 in ComfyUI's layout: `diffusion_model.<BFL module>.lora_A/lora_B` with the scale
    alpha/rank folded into B (the layout has no alpha keys)."""
    plain, fused, unknown = _group(modules, _FLUX2_RULES)
    _refuse_unknown("flux2-klein", unknown)
    out: dict[str, Any] = {}
    scale_of = lambda part: alpha / part[0].shape[0]  # noqa: E731
    for name, module in plain.items():
        down, up = modules[module]
        out[f"{name}.lora_A.weight"] = down.float().contiguous()
        out[f"{name}.lora_B.weight"] = (up.float() * scale_of(modules[module])).contiguous()
    for name, splits in fused.items():
        parts = [modules[m] if m else None for m in splits]
        width = next(p for p in parts if p is not None)[1].shape[0]
        down, up = _fused(parts, [width] * 3, scale_of)
        out[f"{name}.lora_A.weight"] = down.contiguous()
        out[f"{name}.lora_B.weight"] = up.contiguous()
    return out


def _zimage_kohya(modules: Mapping[str, tuple[Any, Any]], alpha: float) -> dict[str, Any]:
    """Z-Image in kohya's key style over diffusers' module names (`lora_unet_layers_0_attention_to_q`),
    with the real alpha: no fused modules."""
    out: dict[str, Any] = {}
    for module, (down, up) in modules.items():
        _kohya_pair(out, "lora_unet_" + module.replace(".", "_"), down.float(), up.float(), alpha)
    return out
