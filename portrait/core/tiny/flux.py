"""Tiny FLUX.1 stand-ins in the real on-disk formats (diffusers folder, BFL single file).

The layout is FLUX.1-dev's: `model_index.json` naming FluxPipeline, `transformer/`
(FluxTransformer2DModel with guidance embedding, as in -dev), `vae/` (a 16-channel
AutoencoderKL with FLUX's scaling and shift factors, no quant convs), `text_encoder/`
(CLIPTextModel, pooled output -> `pooled_projections`), `text_encoder_2/` (T5EncoderModel,
gated-GELU like T5 v1.1 XXL), `tokenizer/` (the real CLIP BPE, portrait.core.tokenizers),
`tokenizer_2/` (a T5-style SentencePiece Unigram `tokenizer.json`) and `scheduler/`
(FlowMatchEulerDiscreteScheduler with -dev's dynamic-shift config).

The T5 tokenizer is not T5's vocabulary: no installed package ships `spiece.model`, and
sentencepiece is not in the lock. The `tokenizers` library (in the lock) builds the same kind
of model, a SentencePiece Unigram with T5's special ids (pad 0, </s> 1, <unk> 2), T5's
Metaspace pre-tokenizer and `</s>` post-processor, and writes the `tokenizer.json` that
FLUX.1-dev's own `tokenizer_2/` also carries; transformers loads it with the same T5
tokenizer class. Its pieces are fixed (characters, then the commonest words of CLIP's BPE
list), so the file is the same on every run; its trainer's output order is not.

Others build adapters that must fit this transformer (InfuseNet, PuLID-FLUX), so every size
lives in TINY_FLUX.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TINY_FLUX: dict[str, Any] = {
    "image_size": 64,  # pixels: 64 -> 8x8 latent (VAE /8) -> 4x4 = 16 packed tokens (2x2 patches)
    "vae_scale_factor": 8,
    "latent_channels": 16,
    "in_channels": 64,  # latent_channels * 2 * 2: FLUX packs 2x2 latent patches into tokens
    "num_layers": 2,  # double-stream blocks (FLUX.1: 19)
    "num_single_layers": 4,  # single-stream blocks (FLUX.1: 38)
    "attention_head_dim": 16,  # FLUX.1: 128
    "num_attention_heads": 2,  # FLUX.1: 24 (inner width 3072)
    "axes_dims_rope": (4, 6, 6),  # sums to attention_head_dim (FLUX.1: 16, 56, 56)
    "joint_attention_dim": 32,  # = T5 d_model (FLUX.1: 4096)
    "pooled_projection_dim": 32,  # = CLIP hidden size (FLUX.1: 768)
    "clip_hidden_size": 32,
    "t5_d_model": 32,
    "t5_d_kv": 8,
    "t5_d_ff": 64,
    "t5_layers": 2,
    "t5_heads": 4,
    "t5_vocab_size": 512,  # the tiny Unigram vocabulary (T5: 32,128)
    "max_sequence_length": 128,  # FLUX.1-dev: 512; the tiny preset keeps the T5 sequence short
    "vae_block_out_channels": (32, 32, 64, 64),
    "vae_scaling_factor": 0.3611,  # FLUX.1 ae's
    "vae_shift_factor": 0.1159,
}

# FLUX.1-dev's scheduler/scheduler_config.json.
SCHEDULER_CONFIG: dict[str, Any] = {
    "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
    "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True,
}


def _seed(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


def transformer(seed: int):
    """A FluxTransformer2DModel of FLUX.1-dev's shape at tiny width (guidance embedding on)."""
    from diffusers import FluxTransformer2DModel

    from .diffusion import fill_zero_weights

    c = TINY_FLUX
    _seed(seed)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=c["in_channels"], num_layers=c["num_layers"],
        num_single_layers=c["num_single_layers"], attention_head_dim=c["attention_head_dim"],
        num_attention_heads=c["num_attention_heads"], joint_attention_dim=c["joint_attention_dim"],
        pooled_projection_dim=c["pooled_projection_dim"], guidance_embeds=True,
        axes_dims_rope=tuple(c["axes_dims_rope"]),
    )
    # The output projection and AdaLN gates start at zero in diffusers; random values make
    # every block matter, so a wrong wire changes the output.
    return fill_zero_weights(model, seed).eval()


def vae(seed: int):
    from diffusers import AutoencoderKL

    c = TINY_FLUX
    _seed(seed)
    n = len(c["vae_block_out_channels"])
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=c["latent_channels"],
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=c["vae_block_out_channels"], layers_per_block=1, norm_num_groups=32,
        sample_size=c["image_size"], scaling_factor=c["vae_scaling_factor"], shift_factor=c["vae_shift_factor"],
        use_quant_conv=False, use_post_quant_conv=False, force_upcast=True,
    ).eval()


def clip_text_encoder(seed: int):
    from transformers import CLIPTextModel

    from .diffusion import text_config

    _seed(seed)
    return CLIPTextModel(text_config(TINY_FLUX["clip_hidden_size"], 2, 2, "quick_gelu")).eval()


def t5_encoder(seed: int):
    from transformers import T5Config, T5EncoderModel

    c = TINY_FLUX
    _seed(seed)
    config = T5Config(vocab_size=c["t5_vocab_size"], d_model=c["t5_d_model"], d_kv=c["t5_d_kv"], d_ff=c["t5_d_ff"],
                      num_layers=c["t5_layers"], num_heads=c["t5_heads"], feed_forward_proj="gated-gelu",
                      relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0,
                      is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5EncoderModel(config).eval()


def scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)


def flux_parts(seed: int) -> dict[str, Any]:
    return {
        "transformer": transformer(seed),
        "vae": vae(seed + 1),
        "text_encoder": clip_text_encoder(seed + 2),
        "text_encoder_2": t5_encoder(seed + 3),
        "scheduler": scheduler(),
    }


def t5_vocab() -> list[tuple[str, float]]:
    """T5's special pieces, then single characters, then whole words from CLIP's BPE list
    (the first merges are the commonest English words), scored so longer known words win."""
    import string

    from ..tokenizers import clip_merges

    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    seen = {p for p, _ in pieces}
    for ch in string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation:
        for piece in (ch, "\u2581" + ch):
            if piece not in seen:
                seen.add(piece)
                pieces.append((piece, -10.0 - len(pieces) * 1e-3))
    for line in clip_merges():
        if len(pieces) >= TINY_FLUX["t5_vocab_size"]:
            break
        if not line.endswith("</w>"):
            continue
        word = line.replace(" ", "").replace("</w>", "")
        piece = "\u2581" + word
        if word.isalpha() and piece not in seen:
            seen.add(piece)
            pieces.append((piece, -1.0 - len(pieces) * 1e-3))
    return pieces


def t5_tokenizer_json() -> str:
    """A T5-style SentencePiece Unigram tokenizer.json: pad 0, </s> 1, <unk> 2, </s> appended,
    built from a fixed vocabulary (the Unigram trainer's output order varies run to run)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram

    tok = Tokenizer(Unigram(t5_vocab(), unk_id=2))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(" {2,}", " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    from tokenizers import decoders

    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    return tok.to_str()


def write_t5_tokenizer(folder: Path) -> None:
    """`tokenizer_2/` as FLUX.1-dev has it (tokenizer.json + config), minus the spiece.model."""
    import tempfile

    from transformers import T5TokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "tokenizer.json"
        raw.write_text(t5_tokenizer_json())
        tok = T5TokenizerFast(tokenizer_file=str(raw), extra_ids=0, model_max_length=TINY_FLUX["max_sequence_length"])
        tok.save_pretrained(str(folder))


def model_index() -> dict[str, Any]:
    import diffusers

    return {"_class_name": "FluxPipeline", "_diffusers_version": diffusers.__version__,
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
            "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
            "feature_extractor": [None, None], "image_encoder": [None, None]}


def _write_clip_tokenizer(folder: Path) -> None:
    from ..tokenizers import EOS, tokenizer_files

    folder.mkdir(parents=True, exist_ok=True)
    for name, text in tokenizer_files(pad_token=EOS).items():
        (folder / name).write_text(text)


def write_flux(root: Path, seed: int) -> None:
    """A FLUX.1-dev-shaped diffusers folder."""
    from .diffusion import write_model_folder

    root = write_model_folder(root, model_index(), flux_parts(seed), ("transformer", "vae", "text_encoder",
                                                                        "text_encoder_2"))
    _write_clip_tokenizer(root / "tokenizer")
    write_t5_tokenizer(root / "tokenizer_2")


# --- InfiniteYou (InfuseNet + identity projection) -------------------------------------------

TINY_INFINITEYOU: dict[str, Any] = {
    "infusenet_layers": 1,  # double blocks of the InfuseNet; their residuals spread over TINY_FLUX's 2
    "infusenet_single_layers": 2,  # single blocks; spread over TINY_FLUX's 4
    "proj_dim": 64, "proj_depth": 2, "proj_dim_head": 64, "proj_heads": 2, "proj_queries": 8,
    "embedding_dim": 512,  # ArcFace
}


def infusenet(seed: int):
    """A FluxControlNetModel shaped like InfiniteYou's InfuseNet at tiny width: no input hint
    block (the control image goes through the VAE), guidance embedding on."""
    from diffusers import FluxControlNetModel

    from .diffusion import fill_zero_weights

    c, i = TINY_FLUX, TINY_INFINITEYOU
    _seed(seed)
    model = FluxControlNetModel(
        patch_size=1, in_channels=c["in_channels"], num_layers=i["infusenet_layers"],
        num_single_layers=i["infusenet_single_layers"], attention_head_dim=c["attention_head_dim"],
        num_attention_heads=c["num_attention_heads"], joint_attention_dim=c["joint_attention_dim"],
        pooled_projection_dim=c["pooled_projection_dim"], guidance_embeds=True, axes_dims_rope=list(c["axes_dims_rope"]),
    )
    # ControlNet output projections start at zero (a no-op net): random values instead.
    return fill_zero_weights(model, seed, std=0.05).eval()


def id_projection_state(seed: int) -> dict[str, Any]:
    from ..archs.infiniteyou import IdProjection

    i = TINY_INFINITEYOU
    _seed(seed)
    model = IdProjection(dim=i["proj_dim"], depth=i["proj_depth"], dim_head=i["proj_dim_head"], heads=i["proj_heads"],
                         num_queries=i["proj_queries"], embedding_dim=i["embedding_dim"],
                         output_dim=TINY_FLUX["joint_attention_dim"])
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _name, param in sorted(model.named_parameters()):
            if param.ndim >= 2 or _name == "latents":
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def write_infiniteyou(root: Path, seed: int) -> None:
    """`InfuseNetModel/` (config + safetensors) and `image_proj_model.bin` ({"image_proj": ...},
    a pickle like the release), as in ByteDance/InfiniteYou infu_flux_v1.0/<variant>/."""
    import torch

    from .diffusion import save_model

    root = Path(root)
    save_model(infusenet(seed), root / "InfuseNetModel")
    torch.save({"image_proj": id_projection_state(seed + 1)}, root / "image_proj_model.bin")
