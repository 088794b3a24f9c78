"""LoRA files: safetensors read/write, and the two LoRA layouts the trainer publishes.

- the trainer's own layout (checkpoints): one flat safetensors file whose keys are
  `<component>.<peft key>` (`unet.down_blocks...lora_A.weight`), read back per component;
- diffusers' layout (`lora.safetensors` in a bundle): written by diffusers' `save_lora_weights`
  with the peft adapter config embedded, so `load_lora_weights` restores the real lora_alpha;
- kohya's layout (`lora_kohya.safetensors`): the key names A1111 and ComfyUI read, with
  `.alpha` = the real lora_alpha (docs/ARCHITECTURE.md#lora-files).

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

__all__ = [
    "write_safetensors", "read_safetensors", "flatten_state", "unflatten_state", "write_lora_file", "read_lora_file",
    "save_diffusers_lora", "kohya_state", "save_kohya_lora", "UNET_TARGETS", "TEXT_TARGETS", "TEXT_COMPONENTS",
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
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline


def _adapter_metadata(rank: int, alpha: float, targets: Sequence[str]) -> dict[str, Any]:
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets)).to_dict()


def save_diffusers_lora(path: Path, family: str, lora: Mapping[str, Mapping[str, Any]], rank: int, alpha: float,
                        unet_targets: Sequence[str] = UNET_TARGETS, text_targets: Sequence[str] = TEXT_TARGETS) -> Path:
    """diffusers' own writer with the adapter config embedded, so `load_lora_weights` restores
    the real lora_alpha (without metadata it would assume alpha = rank)."""
    path = Path(path)
    kwargs: dict[str, Any] = {
        "unet_lora_layers": dict(lora["unet"]),
        "unet_lora_adapter_metadata": _adapter_metadata(rank, alpha, unet_targets),
    }
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
    """
    import torch
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
