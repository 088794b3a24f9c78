"""Tiny stand-ins of the commercially clean frontier bases, in the hub's diffusers layouts.

- FLUX.2 [klein] 4B and its base (`black-forest-labs/FLUX.2-klein-4B`, `...-base-4B`): a
  `Flux2KleinPipeline` folder: `transformer/` (Flux2Transformer2DModel, no guidance embedding),
  `vae/` (AutoencoderKLFlux2: 32 latent channels, 2x2 patchified to 128 and normalised by the
  VAE's own BatchNorm statistics), `text_encoder/` (Qwen3ForCausalLM), `tokenizer/`
  (Qwen2TokenizerFast) and `scheduler/`. The two differ in `model_index.json`'s
  `is_distilled` (4 steps at guidance 1 against 50 at 4.0) and in their weights.
- Z-Image-Turbo and Z-Image (`Tongyi-MAI/...`): a `ZImagePipeline` folder: ZImageTransformer2DModel,
  a 16-channel AutoencoderKL with FLUX.1's scaling and shift, Qwen3Model, Qwen2Tokenizer.
- Qwen-Image-Edit-2511 (`Qwen/Qwen-Image-Edit-2511`): a `QwenImageEditPlusPipeline` folder:
  QwenImageTransformer2DModel, AutoencoderKLQwenImage (a causal 3-D VAE, 16 channels),
  Qwen2_5_VLForConditionalGeneration, `tokenizer/` and `processor/` (Qwen2VLProcessor).

Each diffusers model's sizes come from the real one's config with the widths cut down; the
text width is TINY_QWEN's hidden size (klein stacks three layers: 3 x 32). Weights diffusers
initialises to zero (output projections, AdaLN gates) and Z-Image's `torch.empty` pad tokens
get seeded random values, so every block matters and the files are the same on every run.
The LoRA trainer (issue 28) trains on the klein base and Z-Image stand-ins; every size lives
in the TINY_* tables below. Facts they rely on: docs/ARCHITECTURE.md#frontier-bases.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .qwen import TINY_QWEN

TINY_KLEIN: dict[str, Any] = {
    "image_size": 64,  # 64 px -> 8x8 latent (VAE /8) -> 4x4 = 16 tokens of 2x2 patches
    "latent_channels": 32,  # FLUX.2 VAE: 32 channels, patchified 2x2 -> 128
    "in_channels": 128,
    "num_layers": 2,  # double-stream blocks (klein 4B: 5)
    "num_single_layers": 2,  # single-stream blocks (klein 4B: 20)
    "attention_head_dim": 16,  # klein: 128
    "num_attention_heads": 2,  # klein 4B: 24
    "axes_dims_rope": (4, 4, 4, 4),  # T, H, W, L; sums to attention_head_dim (klein: 32 x 4)
    "joint_attention_dim": 3 * TINY_QWEN["hidden_size"],  # three stacked Qwen3 layers (klein 4B: 3 x 2560)
    "vae_block_out_channels": (32, 32, 64, 64),
    "max_sequence_length": 512,  # the pipeline's default
}

TINY_ZIMAGE: dict[str, Any] = {
    "image_size": 64,
    "latent_channels": 16,
    "dim": 32,  # Z-Image 6B: 3840
    "n_layers": 2,  # 30
    "n_refiner_layers": 1,  # 2
    "n_heads": 2,  # 30
    "axes_dims": (8, 4, 4),  # sums to dim / n_heads (32, 48, 48)
    "axes_lens": (1024, 512, 512),
    "cap_feat_dim": TINY_QWEN["hidden_size"],  # Qwen3-4B: 2560
    "vae_block_out_channels": (32, 32, 64, 64),
    "vae_scaling_factor": 0.3611,  # FLUX.1's ae, which Z-Image uses
    "vae_shift_factor": 0.1159,
}

TINY_QWEN_EDIT: dict[str, Any] = {
    "image_size": 64,
    "z_dim": 16,
    "in_channels": 64,  # z_dim x 2x2 patches
    "num_layers": 2,  # Qwen-Image: 60
    "attention_head_dim": 16,  # 128
    "num_attention_heads": 2,  # 24
    "axes_dims_rope": (4, 6, 6),  # sums to attention_head_dim (16, 56, 56)
    "joint_attention_dim": TINY_QWEN["hidden_size"],  # Qwen2.5-VL-7B: 3584
    "vae_base_dim": 8,  # 96
    "vae_dim_mult": (1, 2, 4, 4),
}

# Scheduler configs as the hub folders carry them (FlowMatchEulerDiscreteScheduler).
KLEIN_SCHEDULER = {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
                   "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True,
                   "time_shift_type": "exponential"}
ZIMAGE_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False}
QWEN_SCHEDULER = {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 8192, "max_shift": 0.9,
                  "num_train_timesteps": 1000, "shift": 1.0, "shift_terminal": 0.02, "use_dynamic_shifting": True,
                  "time_shift_type": "exponential"}


def _seed(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


def _random_buffers(module, seed: int, names: tuple[str, ...], low: float = 0.5, high: float = 1.5) -> None:
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in names:
            tensor = module.get_buffer(name) if name in dict(module.named_buffers()) else module.get_parameter(name)
            tensor.copy_(torch.rand(tensor.shape, generator=generator) * (high - low) + low)


# --- FLUX.2 [klein] ------------------------------------------------------------------------


def klein_transformer(seed: int):
    from diffusers import Flux2Transformer2DModel

    from .diffusion import fill_zero_weights

    c = TINY_KLEIN
    _seed(seed)
    model = Flux2Transformer2DModel(
        patch_size=1, in_channels=c["in_channels"], num_layers=c["num_layers"], num_single_layers=c["num_single_layers"],
        attention_head_dim=c["attention_head_dim"], num_attention_heads=c["num_attention_heads"],
        joint_attention_dim=c["joint_attention_dim"], timestep_guidance_channels=256, mlp_ratio=3.0,
        axes_dims_rope=tuple(c["axes_dims_rope"]), guidance_embeds=False,
    )
    return fill_zero_weights(model, seed).eval()


def klein_vae(seed: int):
    from diffusers import AutoencoderKLFlux2

    c = TINY_KLEIN
    _seed(seed)
    n = len(c["vae_block_out_channels"])
    vae = AutoencoderKLFlux2(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=c["vae_block_out_channels"], layers_per_block=1,
        latent_channels=c["latent_channels"], norm_num_groups=32, sample_size=c["image_size"],
    )
    # The latent BatchNorm's running statistics normalise every latent the pipeline reads and
    # writes; the real ones are far from the initial 0/1, so the stand-in's are random too.
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        vae.bn.running_mean.copy_(torch.randn(vae.bn.running_mean.shape, generator=generator) * 0.2)
        vae.bn.running_var.copy_(torch.rand(vae.bn.running_var.shape, generator=generator) + 0.5)
    return vae.eval()


def klein_index(distilled: bool) -> dict[str, Any]:
    import diffusers

    return {"_class_name": "Flux2KleinPipeline", "_diffusers_version": diffusers.__version__, "is_distilled": distilled,
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", "Qwen3ForCausalLM"], "tokenizer": ["transformers", "Qwen2TokenizerFast"],
            "transformer": ["diffusers", "Flux2Transformer2DModel"], "vae": ["diffusers", "AutoencoderKLFlux2"]}


def klein_parts(seed: int) -> dict[str, Any]:
    from diffusers import FlowMatchEulerDiscreteScheduler

    from .qwen import qwen3_causal_lm

    return {"transformer": klein_transformer(seed), "vae": klein_vae(seed + 1),
            "text_encoder": qwen3_causal_lm(seed + 2), "scheduler": FlowMatchEulerDiscreteScheduler(**KLEIN_SCHEDULER)}


def _write_klein(root: Path, seed: int, distilled: bool) -> None:
    from .diffusion import write_model_folder
    from .qwen import write_tokenizer

    root = write_model_folder(root, klein_index(distilled), klein_parts(seed), ("transformer", "vae", "text_encoder"))
    write_tokenizer(root / "tokenizer", TINY_KLEIN["max_sequence_length"])


def write_klein(root: Path, seed: int) -> None:
    """FLUX.2 [klein] 4B's folder (step-distilled: is_distilled true) at tiny size."""
    _write_klein(root, seed, distilled=True)


def write_klein_base(root: Path, seed: int) -> None:
    """FLUX.2 [klein] base 4B's folder (undistilled, CFG): its own seed, is_distilled false."""
    _write_klein(root, seed, distilled=False)


# --- Z-Image -------------------------------------------------------------------------------


def zimage_transformer(seed: int):
    from diffusers import ZImageTransformer2DModel

    from .diffusion import fill_zero_weights

    c = TINY_ZIMAGE
    _seed(seed)
    model = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=c["latent_channels"], dim=c["dim"],
        n_layers=c["n_layers"], n_refiner_layers=c["n_refiner_layers"], n_heads=c["n_heads"], n_kv_heads=c["n_heads"],
        norm_eps=1e-5, qk_norm=True, cap_feat_dim=c["cap_feat_dim"], rope_theta=256.0, t_scale=1000.0,
        axes_dims=list(c["axes_dims"]), axes_lens=list(c["axes_lens"]),
    )
    # x_pad_token / cap_pad_token come from torch.empty (whatever memory held): seeded values.
    _random_buffers(model, seed, ("x_pad_token", "cap_pad_token"), -1.0, 1.0)
    return fill_zero_weights(model, seed).eval()


def zimage_vae(seed: int):
    from diffusers import AutoencoderKL

    c = TINY_ZIMAGE
    _seed(seed)
    n = len(c["vae_block_out_channels"])
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=c["latent_channels"], down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=c["vae_block_out_channels"], layers_per_block=1,
        norm_num_groups=32, sample_size=c["image_size"], scaling_factor=c["vae_scaling_factor"],
        shift_factor=c["vae_shift_factor"], use_quant_conv=False, use_post_quant_conv=False, force_upcast=True,
    ).eval()


def zimage_index() -> dict[str, Any]:
    import diffusers

    return {"_class_name": "ZImagePipeline", "_diffusers_version": diffusers.__version__,
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", "Qwen3Model"], "tokenizer": ["transformers", "Qwen2Tokenizer"],
            "transformer": ["diffusers", "ZImageTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}


def zimage_parts(seed: int) -> dict[str, Any]:
    from diffusers import FlowMatchEulerDiscreteScheduler

    from .qwen import qwen3_model

    return {"transformer": zimage_transformer(seed), "vae": zimage_vae(seed + 1), "text_encoder": qwen3_model(seed + 2),
            "scheduler": FlowMatchEulerDiscreteScheduler(**ZIMAGE_SCHEDULER)}


def write_zimage(root: Path, seed: int) -> None:
    """Z-Image(-Turbo)'s folder at tiny size (Turbo and base differ in weights and use)."""
    from .diffusion import write_model_folder
    from .qwen import write_tokenizer

    root = write_model_folder(root, zimage_index(), zimage_parts(seed), ("transformer", "vae", "text_encoder"))
    write_tokenizer(root / "tokenizer", 512)


# --- Qwen-Image-Edit-2511 ------------------------------------------------------------------


def qwen_edit_transformer(seed: int):
    from diffusers import QwenImageTransformer2DModel

    from .diffusion import fill_zero_weights

    c = TINY_QWEN_EDIT
    _seed(seed)
    model = QwenImageTransformer2DModel(
        patch_size=2, in_channels=c["in_channels"], out_channels=c["z_dim"], num_layers=c["num_layers"],
        attention_head_dim=c["attention_head_dim"], num_attention_heads=c["num_attention_heads"],
        joint_attention_dim=c["joint_attention_dim"], guidance_embeds=False, axes_dims_rope=tuple(c["axes_dims_rope"]),
        # 2511's reference-image tokens at timestep 0: diffusers added the flag for 2511; whether the
        # real config sets it was not read here (docs/ARCHITECTURE.md#frontier-bases)
        zero_cond_t=True,
    )
    return fill_zero_weights(model, seed).eval()


def qwen_edit_vae(seed: int):
    from diffusers import AutoencoderKLQwenImage

    c = TINY_QWEN_EDIT
    _seed(seed)
    return AutoencoderKLQwenImage(base_dim=c["vae_base_dim"], z_dim=c["z_dim"], dim_mult=list(c["vae_dim_mult"]),
                                  num_res_blocks=1, attn_scales=[], temperal_downsample=[False, True, True]).eval()


def qwen_edit_index() -> dict[str, Any]:
    import diffusers

    return {"_class_name": "QwenImageEditPlusPipeline", "_diffusers_version": diffusers.__version__,
            "processor": ["transformers", "Qwen2VLProcessor"],
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
            "tokenizer": ["transformers", "Qwen2Tokenizer"],
            "transformer": ["diffusers", "QwenImageTransformer2DModel"], "vae": ["diffusers", "AutoencoderKLQwenImage"]}


def qwen_edit_parts(seed: int) -> dict[str, Any]:
    from diffusers import FlowMatchEulerDiscreteScheduler

    from .qwen import qwen25_vl

    return {"transformer": qwen_edit_transformer(seed), "vae": qwen_edit_vae(seed + 1),
            "text_encoder": qwen25_vl(seed + 2), "scheduler": FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER)}


def write_qwen_edit(root: Path, seed: int) -> None:
    """Qwen-Image-Edit-2511's folder at tiny size (tokenizer/ and processor/ as the hub has them)."""
    from .diffusion import write_model_folder
    from .qwen import processor, write_tokenizer

    root = write_model_folder(root, qwen_edit_index(), qwen_edit_parts(seed), ("transformer", "vae", "text_encoder"))
    write_tokenizer(root / "tokenizer", 1024)
    processor(1024).save_pretrained(str(root / "processor"))


def f2p_lora_state(seed: int) -> dict[str, Any]:
    """A LoRA for the tiny Qwen-Image-Edit transformer in DiffSynth-Studio's layout: PEFT's
    `default` adapter names on the diffusers module paths (`transformer_blocks.N.attn.to_q.
    lora_A.default.weight`), which diffusers' Qwen-Image LoRA converter reads. Rank 4 on the
    image and text attention projections of every block."""
    import torch

    c = TINY_QWEN_EDIT
    inner = c["num_attention_heads"] * c["attention_head_dim"]
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for block in range(c["num_layers"]):
        for proj in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"):
            key = f"transformer_blocks.{block}.attn.{proj}"
            state[f"{key}.lora_A.default.weight"] = torch.randn(4, inner, generator=generator) * 0.3
            state[f"{key}.lora_B.default.weight"] = torch.randn(inner, 4, generator=generator) * 0.3
    return state


def write_qwen_edit_f2p(root: Path, seed: int) -> None:
    """`model.safetensors`, the file name DiffSynth-Studio/Qwen-Image-Edit-F2P's card loads."""
    from safetensors.torch import save_file

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in f2p_lora_state(seed).items()}, str(root / "model.safetensors"))
