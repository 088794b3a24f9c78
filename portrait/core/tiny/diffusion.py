"""Tiny Stable Diffusion stand-ins (SD1.5 and SDXL shapes) in the real on-disk formats.

Every maker is `write(root, seed)`: same seed, byte-identical files. The weights are random
but the layouts are real: diffusers pipeline folders (model_index.json, unet/, vae/,
text_encoder[_2]/, tokenizer[_2]/ with the real CLIP vocabulary, scheduler/), A1111-layout
single-file checkpoints with a config folder for `from_single_file(config=...)`, and
ControlNets (folder, fp16 variant, single file, and InstantID's `ControlNetModel/` layout).

Others build adapters that must fit these models, so every size lives in TINY_SD15 /
TINY_SDXL. Notes on the choices:
- text encoders keep the real vocabulary (49,408 tokens) so the real tokenizer works; the
  embedding table is most of each model's bytes, so the hidden sizes stay small;
- SDXL's two text encoders have different hidden sizes (32 and 64): diffusers tells them
  apart in single files by that width (docs/ARCHITECTURE.md#tiny-models);
- the VAE has 4 blocks, so it downsamples by 8 like every real SD VAE (64 px image -> 8 px
  latent) and the ControlNet hint encoder has 4 levels to match. Latent sizes, mask
  downsampling and size multiples are then tested at the factor real models use, and a
  training step splits its cost between VAE and UNet roughly as the real models do (the
  earlier 2-block VAE left a 32 px latent whose 1,024-token attention dwarfed everything);
- ControlNet zero-convolutions are zero at initialisation, which would make every tiny
  ControlNet a no-op; we give every all-zero weight small random values instead.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..tokenizers import EOS, tokenizer_files

TINY_SD15: dict[str, Any] = {
    "image_size": 64,  # pixels; multiples of 8 keep every sampler and ControlNet happy
    "vae_scale_factor": 8,
    "sample_size": 8,  # latent size = image_size / vae_scale_factor
    "latent_channels": 4,
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "attention_head_dim": 8,  # diffusers' legacy meaning: number of heads
    "cross_attention_dim": 32,
    "text_hidden_size": 32,
    "text_layers": 2,
    "text_heads": 2,
    "text_intermediate_size": 64,
    "vae_block_out_channels": (32, 32, 64, 64),
    "controlnet_conditioning_channels": (16, 16, 32, 32),
    "vocab_size": 49408,
}

TINY_SDXL: dict[str, Any] = {
    "image_size": 64,
    "vae_scale_factor": 8,
    "sample_size": 8,
    "latent_channels": 4,
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "attention_head_dim": (2, 4),
    "transformer_layers_per_block": (1, 2),
    "text_hidden_size": 32,  # text_encoder (CLIP-L shaped)
    "text_2_hidden_size": 64,  # text_encoder_2 (OpenCLIP bigG shaped), with projection
    "text_2_projection_dim": 32,  # pooled text_embeds width
    "cross_attention_dim": 96,  # = text_hidden_size + text_2_hidden_size
    "text_layers": 2,
    "text_heads": 2,
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 80,  # 6 * addition_time_embed_dim + text_2_projection_dim
    "vae_block_out_channels": (32, 32, 64, 64),
    "vae_scaling_factor": 0.13025,
    "controlnet_conditioning_channels": (16, 16, 32, 32),
    "vocab_size": 49408,
}

# Real scheduler settings (stable-diffusion-v1-5 uses PNDM, SDXL base uses Euler).
_SCHEDULER_COMMON = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                     "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
                     "steps_offset": 1, "clip_sample": False}


# --- building blocks ------------------------------------------------------------------


def _seed(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


def _fill_zero_weights(model, seed: int, std: float = 0.02):
    """Give zero-initialised weight matrices small random values (see module notes)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _name, param in sorted(model.named_parameters()):
            if param.ndim >= 2 and not param.any():
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    return model


def _sd15_unet(seed: int, in_channels: int = 4):
    from diffusers import UNet2DConditionModel

    c = TINY_SD15
    _seed(seed)
    return UNet2DConditionModel(
        sample_size=c["sample_size"], in_channels=in_channels, out_channels=c["latent_channels"],
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=c["block_out_channels"], layers_per_block=c["layers_per_block"],
        attention_head_dim=c["attention_head_dim"], cross_attention_dim=c["cross_attention_dim"],
        norm_num_groups=32,
    ).eval()


def _sdxl_unet(seed: int, in_channels: int = 4):
    from diffusers import UNet2DConditionModel

    c = TINY_SDXL
    _seed(seed)
    return UNet2DConditionModel(
        sample_size=c["sample_size"], in_channels=in_channels, out_channels=c["latent_channels"],
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=c["block_out_channels"], layers_per_block=c["layers_per_block"],
        attention_head_dim=c["attention_head_dim"], transformer_layers_per_block=c["transformer_layers_per_block"],
        cross_attention_dim=c["cross_attention_dim"], use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=c["addition_time_embed_dim"],
        projection_class_embeddings_input_dim=c["projection_class_embeddings_input_dim"], norm_num_groups=32,
    ).eval()


def _vae(seed: int, family: str):
    from diffusers import AutoencoderKL

    c = TINY_SDXL if family == "sdxl" else TINY_SD15
    _seed(seed)
    extra = {"scaling_factor": c["vae_scaling_factor"], "force_upcast": True} if family == "sdxl" else {}
    n = len(c["vae_block_out_channels"])
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=c["latent_channels"],
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=c["vae_block_out_channels"], layers_per_block=1, norm_num_groups=32,
        sample_size=c["image_size"], **extra,
    ).eval()


def _text_config(hidden: int, layers: int, heads: int, act: str, projection_dim: int | None = None):
    from transformers import CLIPTextConfig

    # bos/eos/pad ids 0/2/1 are what the real SD text encoder configs say (a legacy of
    # the original conversion); transformers then pools at the argmax token, which is EOS.
    return CLIPTextConfig(
        vocab_size=TINY_SD15["vocab_size"], hidden_size=hidden, intermediate_size=hidden * 2,
        num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
        hidden_act=act, projection_dim=projection_dim or hidden, bos_token_id=0, eos_token_id=2, pad_token_id=1,
    )


def _sd15_text_encoder(seed: int):
    from transformers import CLIPTextModel

    c = TINY_SD15
    _seed(seed)
    return CLIPTextModel(_text_config(c["text_hidden_size"], c["text_layers"], c["text_heads"], "quick_gelu")).eval()


def _sdxl_text_encoders(seed: int):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    c = TINY_SDXL
    _seed(seed)
    one = CLIPTextModel(_text_config(c["text_hidden_size"], c["text_layers"], c["text_heads"], "quick_gelu"))
    two = CLIPTextModelWithProjection(
        _text_config(c["text_2_hidden_size"], c["text_layers"], c["text_heads"], "gelu", c["text_2_projection_dim"]))
    return one.eval(), two.eval()


def _scheduler(family: str):
    from diffusers import EulerDiscreteScheduler, PNDMScheduler

    if family == "sdxl":
        return EulerDiscreteScheduler(**{k: v for k, v in _SCHEDULER_COMMON.items() if k not in ("clip_sample", "skip_prk_steps", "set_alpha_to_one")},
                                      interpolation_type="linear", timestep_spacing="leading", prediction_type="epsilon")
    return PNDMScheduler(**{k: v for k, v in _SCHEDULER_COMMON.items() if k != "clip_sample"})


def sd15_parts(seed: int, inpaint: bool = False) -> dict[str, Any]:
    """The modules of a tiny SD1.5 pipeline (in memory); the same seed gives the same weights."""
    return {
        "unet": _fill_zero_weights(_sd15_unet(seed, in_channels=9 if inpaint else 4), seed),
        "vae": _vae(seed + 1, "sd15"),
        "text_encoder": _sd15_text_encoder(seed + 2),
        "scheduler": _scheduler("sd15"),
    }


def sdxl_parts(seed: int) -> dict[str, Any]:
    one, two = _sdxl_text_encoders(seed + 2)
    return {
        "unet": _fill_zero_weights(_sdxl_unet(seed), seed),
        "vae": _vae(seed + 1, "sdxl"),
        "text_encoder": one,
        "text_encoder_2": two,
        "scheduler": _scheduler("sdxl"),
    }


# --- writing --------------------------------------------------------------------------


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _write_tokenizers(root: Path, family: str) -> None:
    # pad tokens: SD1.5 and SDXL's first tokenizer pad with EOS, SDXL's tokenizer_2 with "!"
    folders = {"tokenizer": EOS} if family == "sd15" else {"tokenizer": EOS, "tokenizer_2": "!"}
    cache: dict[str, dict[str, str]] = {}
    for folder, pad in folders.items():
        files = cache.setdefault(pad, tokenizer_files(pad_token=pad))
        for name, text in files.items():
            (root / folder).mkdir(parents=True, exist_ok=True)
            (root / folder / name).write_text(text)


def _model_index(family: str, inpaint: bool = False) -> dict[str, Any]:
    import diffusers

    if family == "sdxl":
        return {"_class_name": "StableDiffusionXLPipeline", "_diffusers_version": diffusers.__version__,
                "force_zeros_for_empty_prompt": True, "scheduler": ["diffusers", "EulerDiscreteScheduler"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
                "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
                "feature_extractor": [None, None], "image_encoder": [None, None]}
    return {"_class_name": "StableDiffusionInpaintPipeline" if inpaint else "StableDiffusionPipeline",
            "_diffusers_version": diffusers.__version__, "requires_safety_checker": False,
            "feature_extractor": [None, None], "image_encoder": [None, None], "safety_checker": [None, None],
            "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"]}


def _save_model(model, folder: Path, variant: str | None = None) -> None:
    """save_pretrained, fp16 when the real file is an fp16 variant (as the real repos ship it)."""
    import logging

    import torch

    # diffusers warns on any `.to(dtype)` of a model; here the cast is the point.
    quiet = logging.getLogger("diffusers.models.modeling_utils")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        if variant == "fp16":
            model = model.to(torch.float16)
        model.save_pretrained(folder, safe_serialization=True, variant=variant)
        if variant == "fp16":
            model.to(torch.float32)
    finally:
        quiet.setLevel(level)


def write_pipeline_folder(root: Path, parts: dict[str, Any], family: str, inpaint: bool = False,
                          unet_variant: str | None = None) -> None:
    """A diffusers pipeline folder, written component by component so each file is ours to pin."""
    root = Path(root)
    _write_json(root / "model_index.json", _model_index(family, inpaint))
    _save_model(parts["unet"], root / "unet", unet_variant)
    _save_model(parts["vae"], root / "vae")
    for name in ("text_encoder", "text_encoder_2"):
        if name in parts:
            _save_model(parts[name], root / name)
    parts["scheduler"].save_pretrained(root / "scheduler")
    _write_tokenizers(root, family)


def write_model_folder(root: Path, index: dict[str, Any], parts: dict[str, Any], models: tuple[str, ...]) -> Path:
    """A transformer family's diffusers folder (FLUX, FLUX.2 [klein], Z-Image, Qwen-Image-Edit):
    its model_index.json, each of `models` saved, the scheduler's config; tokenizers and
    processors are the caller's (each family ships its own)."""
    root = Path(root)
    _write_json(root / "model_index.json", index)
    for name in models:
        _save_model(parts[name], root / name)
    parts["scheduler"].save_pretrained(root / "scheduler")
    return root


def write_config_folder(root: Path, parts: dict[str, Any], family: str) -> None:
    """What `from_single_file(config=root)` needs offline: configs and tokenizers, no weights."""
    root = Path(root)
    index = _model_index(family)
    _write_json(root / "model_index.json", index)
    parts["unet"].save_config(root / "unet")
    parts["vae"].save_config(root / "vae")
    for name in ("text_encoder", "text_encoder_2"):
        if name in parts:
            parts[name].config.save_pretrained(root / name)
    parts["scheduler"].save_config(root / "scheduler")
    _write_tokenizers(root, family)


def single_file_state(parts: dict[str, Any], family: str) -> dict[str, Any]:
    """The whole pipeline as one original-layout (A1111 / SGM) state dict."""
    from . import ldm

    state = {}
    state.update(ldm.unet_to_ldm(parts["unet"].state_dict(), parts["unet"].config))
    state.update(ldm.vae_to_ldm(parts["vae"].state_dict(), parts["vae"].config))
    if family == "sdxl":
        state.update(ldm.clip_to_ldm(parts["text_encoder"].state_dict(), ldm.SDXL_CLIP_PREFIX))
        state.update(ldm.openclip_to_ldm(parts["text_encoder_2"].state_dict()))
    else:
        state.update(ldm.clip_to_ldm(parts["text_encoder"].state_dict(), ldm.SD15_CLIP_PREFIX))
    return state


def save_state(path: Path, state: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(path), metadata={"format": "pt"})


# --- makers (registered in presets/models.yaml) ------------------------------------------


def write_sd15(root: Path, seed: int) -> None:
    write_pipeline_folder(root, sd15_parts(seed), "sd15")


def write_sd15_inpaint(root: Path, seed: int) -> None:
    write_pipeline_folder(root, sd15_parts(seed, inpaint=True), "sd15", inpaint=True)


def write_sd15_vae(root: Path, seed: int) -> None:
    _save_model(_vae(seed, "sd15"), Path(root))


def write_sd15_single(root: Path, seed: int) -> None:
    """`tiny-sd15.safetensors` in the v1-5-pruned layout, plus `config/` for from_single_file."""
    parts = sd15_parts(seed)
    save_state(Path(root) / "tiny-sd15.safetensors", single_file_state(parts, "sd15"))
    write_config_folder(Path(root) / "config", parts, "sd15")


def write_sdxl(root: Path, seed: int) -> None:
    # The real SDXL base ships its UNet only as the fp16 variant; mirror that.
    write_pipeline_folder(root, sdxl_parts(seed), "sdxl", unet_variant="fp16")


def write_sdxl_single(root: Path, seed: int) -> None:
    parts = sdxl_parts(seed)
    save_state(Path(root) / "tiny-sdxl.safetensors", single_file_state(parts, "sdxl"))
    write_config_folder(Path(root) / "config", parts, "sdxl")


def write_sdxl_vae(root: Path, seed: int) -> None:
    _save_model(_vae(seed, "sdxl"), Path(root))


def _controlnet(seed: int, family: str):
    from diffusers import ControlNetModel

    c = TINY_SDXL if family == "sdxl" else TINY_SD15
    unet = _sdxl_unet(seed) if family == "sdxl" else _sd15_unet(seed)
    _seed(seed + 7)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=c["controlnet_conditioning_channels"])
    return _fill_zero_weights(net.eval(), seed + 8)


def _controlnet_folder(family: str, variant: str | None = None):
    def write(root: Path, seed: int) -> None:
        _save_model(_controlnet(seed, family), Path(root), variant)

    return write


# diffusers' SDXL depth ships an fp16 variant; the others plain (the SD1.5 ControlNets are single files,
# below; the fp16 folder writer stays for the folder layout users bring with --controlnet PATH).
write_controlnet_sd15_fp16 = _controlnet_folder("sd15", "fp16")
write_controlnet_sdxl = _controlnet_folder("sdxl")
write_controlnet_sdxl_fp16 = _controlnet_folder("sdxl", "fp16")


def _controlnet_sd15_single(name: str):
    """ControlNet-v1-1 single-file layout (comfyanonymous' fp16 files, which the registry's SD1.5
    ControlNets are) + `config/`."""

    def write(root: Path, seed: int) -> None:
        import torch

        from . import ldm

        net = _controlnet(seed, "sd15")
        state = {k: v.to(torch.float16) for k, v in ldm.controlnet_to_ldm(net.state_dict(), net.config).items()}
        save_state(Path(root) / name, state)
        net.save_config(Path(root) / "config")

    return write


write_controlnet_sd15_single = _controlnet_sd15_single("tiny-controlnet-tile.safetensors")
write_controlnet_sd15_canny = _controlnet_sd15_single("tiny-controlnet-canny.safetensors")
write_controlnet_sd15_openpose = _controlnet_sd15_single("tiny-controlnet-openpose.safetensors")
write_controlnet_sd15_depth = _controlnet_sd15_single("tiny-controlnet-depth.safetensors")


def write_instantid_controlnet(root: Path, seed: int) -> None:
    """IdentityNet: an SDXL ControlNet at InstantX/InstantID's `ControlNetModel/` path."""
    _save_model(_controlnet(seed, "sdxl"), Path(root) / "ControlNetModel")


# Public names for the other make-tiny modules (tiny/flux.py builds FLUX stand-ins the same way).
fill_zero_weights = _fill_zero_weights
text_config = _text_config
save_model = _save_model
