"""make-tiny diffusion models: the real tokenizer, determinism, and every model running
through portrait.core.loaders (the same functions real models go through)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from portrait.core import loaders
from portrait.core.config import Settings
from portrait.core.registry import make_tiny
from portrait.core.tiny import diffusion
from portrait.core.tokenizers import write_clip_tokenizer

PIPELINES = ["tiny-sd15", "tiny-sd15-inpaint", "tiny-sd15-single", "tiny-sdxl", "tiny-sdxl-single"]
CONTROLNETS = ["tiny-controlnet-sd15-canny", "tiny-controlnet-sd15-openpose", "tiny-controlnet-sd15-depth",
               "tiny-controlnet-sd15-tile", "tiny-controlnet-sdxl-canny", "tiny-controlnet-sdxl-openpose",
               "tiny-controlnet-sdxl-depth", "tiny-instantid-controlnet"]
VAES = ["tiny-sd15-vae", "tiny-sdxl-vae"]
MINE = PIPELINES + CONTROLNETS + VAES


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _run(pipe, **kw):
    out = pipe("a photo of a person", num_inference_steps=2, height=64, width=64, guidance_scale=5.0,
               generator=torch.Generator().manual_seed(0), output_type="np", **kw)
    return out.images[0]


def test_tokenizer_is_the_real_clip_vocabulary(tmp_path):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp_path / "tok"))
    assert len(tok) == 49408
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    padded = tok("a cat", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[-1] == 49407  # SD pads with <|endoftext|>
    tok2 = CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp_path / "tok2", pad_token="!"))
    assert tok2("a cat", padding="max_length", max_length=77).input_ids[-1] == 0  # SDXL tokenizer_2 pads with "!"


def test_make_tiny_is_deterministic(tiny_home, tmp_path):
    """The session home was made with seed 0; a second home with seed 0 matches byte for byte."""
    again = Settings(home=tmp_path / "again", preset="tiny", device="cpu")
    make_tiny(again, seed=0, only=MINE)
    for model_id in MINE:
        first, second = _hashes(tiny_home.models_dir / model_id), _hashes(again.models_dir / model_id)
        assert first and first == second, model_id


def test_a_different_seed_gives_different_weights(tiny_home, tmp_path):
    other = Settings(home=tmp_path / "other", preset="tiny", device="cpu")
    make_tiny(other, seed=1, only=["tiny-sd15-vae", "tiny-controlnet-sd15-canny"])
    for model_id in ("tiny-sd15-vae", "tiny-controlnet-sd15-canny"):
        a, b = _hashes(tiny_home.models_dir / model_id), _hashes(other.models_dir / model_id)
        assert a.keys() == b.keys()
        assert any(a[k] != b[k] for k in a if "safetensors" in k), model_id
        assert all(a[k] == b[k] for k in a if k.endswith("config.json")), model_id


def test_make_tiny_replaces_stand_ins_from_an_older_version(tmp_path):
    """A HOME made before the shapes changed has no (or an old) stamp: make-tiny rewrites it."""
    from portrait.core.tiny import STAMP

    home = Settings(home=tmp_path / "home", preset="tiny", device="cpu")
    assert make_tiny(home, only=["tiny-sd15-vae"])
    assert make_tiny(home, only=["tiny-sd15-vae"]) == []  # current: left alone
    model = home.models_dir / "tiny-sd15-vae"
    config = next(model.rglob("config.json"))
    (model / STAMP).unlink()
    config.write_text("{}")
    assert make_tiny(home, only=["tiny-sd15-vae"]) == [model]
    assert len(json.loads(config.read_text())["block_out_channels"]) == 4


def test_tiny_sizes_fit_what_adapters_assume():
    assert TINY_SDXL_CROSS == diffusion.TINY_SDXL["text_hidden_size"] + diffusion.TINY_SDXL["text_2_hidden_size"]
    sdxl = diffusion.TINY_SDXL
    assert sdxl["projection_class_embeddings_input_dim"] == 6 * sdxl["addition_time_embed_dim"] + sdxl["text_2_projection_dim"]
    assert sdxl["text_hidden_size"] != sdxl["text_2_hidden_size"]
    for family in (diffusion.TINY_SD15, diffusion.TINY_SDXL):
        assert family["image_size"] == family["sample_size"] * family["vae_scale_factor"]
        assert 2 ** (len(family["controlnet_conditioning_channels"]) - 1) == family["vae_scale_factor"]
        assert 2 ** (len(family["vae_block_out_channels"]) - 1) == family["vae_scale_factor"]


TINY_SDXL_CROSS = diffusion.TINY_SDXL["cross_attention_dim"]


@pytest.mark.parametrize("model_id", PIPELINES)
def test_each_tiny_pipeline_runs_through_the_loader(ctx, model_id, astronaut):
    from PIL import Image

    spec = ctx.registry.get(model_id)
    if spec.id.endswith("inpaint"):
        pipe = loaders.load_pipeline(ctx, model_id, kind="inpaint")
        image = Image.fromarray(astronaut).resize((64, 64))
        mask = Image.new("L", (64, 64), 0)
        mask.paste(255, (16, 16, 48, 48))
        assert pipe.unet.config.in_channels == 9
        out = _run(pipe, image=image, mask_image=mask, strength=1.0)
    else:
        pipe = loaders.load_pipeline(ctx, model_id, family=spec.family)
        out = _run(pipe)
    assert out.shape == (64, 64, 3)
    assert np.isfinite(out).all() and out.std() > 0.01


@pytest.mark.parametrize("model_id", CONTROLNETS)
def test_each_tiny_controlnet_runs_in_a_pipeline(ctx, model_id, astronaut):
    from PIL import Image

    family = ctx.registry.get(model_id).family
    base = "tiny-sdxl" if family == "sdxl" else "tiny-sd15"
    pipe = loaders.load_pipeline(ctx, base, controlnets=[model_id], family=family)
    control = Image.fromarray(astronaut).resize((64, 64))
    with_control = _run(pipe, image=control, controlnet_conditioning_scale=1.0)
    without = _run(pipe, image=control, controlnet_conditioning_scale=0.0)
    assert with_control.shape == (64, 64, 3)
    assert np.abs(with_control - without).max() > 1e-4  # the tiny ControlNet is not a zero-conv no-op


@pytest.mark.parametrize("model_id", VAES)
def test_each_tiny_vae_round_trips(ctx, model_id, astronaut):
    vae = loaders.load_vae(ctx, model_id)
    x = torch.from_numpy(astronaut[:64, :64]).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        latent = vae.encode(x).latent_dist.mode()
        back = vae.decode(latent).sample
    assert latent.shape == (1, 4, 8, 8)  # a 4-block VAE downsamples by 8, as real ones do
    assert back.shape == x.shape


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_single_file_matches_the_folder_with_the_same_weights(ctx, tmp_path, family):
    """The A1111-layout file, loaded by diffusers' from_single_file offline, is the folder model."""
    folder, single = tmp_path / "folder", tmp_path / "single"
    if family == "sd15":
        diffusion.write_sd15(folder, 7)
        diffusion.write_sd15_single(single, 7)
        file, folder_id, single_id = single / "tiny-sd15.safetensors", "sd15", "sd15-single"
    else:
        diffusion.write_sdxl(folder, 7)
        diffusion.write_sdxl_single(single, 7)
        file, folder_id, single_id = single / "tiny-sdxl.safetensors", "sdxl", "sdxl-single"
    a = loaders.load_components(ctx, folder_id, family=family, base_path=folder, vae=None)
    b = loaders.load_components(ctx, single_id, family=family, base_path=file, vae=None)
    assert b.source == file
    if family == "sdxl":
        # the folder mirrors the real SDXL base, whose UNet ships only as an fp16 variant
        b["unet"].to(torch.float16).to(torch.float32)
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if part not in a.modules:
            continue
        sa, sb = a[part].state_dict(), b[part].state_dict()
        assert sa.keys() == sb.keys(), part
        for key in sa:
            assert torch.equal(sa[key].float(), sb[key].float()), (part, key)
    pa = loaders.load_pipeline(ctx, folder_id, family=family, base_path=folder, vae=None)
    pb = loaders.load_pipeline(ctx, single_id, family=family, base_path=file, vae=None)
    np.testing.assert_allclose(_run(pa), _run(pb), atol=1e-5)


def test_single_file_controlnet_matches_its_weights(ctx, tmp_path):
    """The ControlNet-v1-1 single-file layout round-trips through from_single_file."""
    from diffusers import ControlNetModel

    diffusion.write_controlnet_sd15_single(tmp_path / "single", 3)
    diffusion.write_controlnet_sd15_fp16(tmp_path / "folder", 3)
    a = loaders.load_controlnet(ctx, "controlnet-tile-sd15", explicit=tmp_path / "single" / "tiny-controlnet-tile.safetensors")
    b = ControlNetModel.from_pretrained(tmp_path / "folder", variant="fp16", torch_dtype=torch.float32)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_ldm_layout_round_trips_at_real_size(ctx, family):
    """At the real architectures (meta tensors, no memory), our diffusers -> LDM names go back
    through diffusers' own single-file converters to exactly the original keys and shapes."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from portrait.core.tiny import ldm

    folder = loaders.single_file_config(ctx, None, family)
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
    for model, to_ldm, back in (
        (unet, ldm.unet_to_ldm, sfu.convert_ldm_unet_checkpoint),
        (vae, ldm.vae_to_ldm, sfu.convert_ldm_vae_checkpoint),
    ):
        state = model.state_dict()
        converted = back(to_ldm(state, model.config), model.config)
        assert converted.keys() == state.keys()
        assert all(converted[k].shape == state[k].shape for k in state)
    if family == "sdxl":
        with init_empty_weights():
            te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2"))
        state = te2.state_dict()
        original = ldm.openclip_to_ldm(state)
        assert original[ldm.SDXL_OPENCLIP_PREFIX + "transformer.resblocks.31.attn.in_proj_weight"].shape == (3840, 1280)
        converted = sfu.convert_open_clip_checkpoint(te2, original, prefix=ldm.SDXL_OPENCLIP_PREFIX)
        assert {k for k in state if not k.endswith("position_ids")} == set(converted)
        assert all(converted[k].shape == state[k].shape for k in converted)
