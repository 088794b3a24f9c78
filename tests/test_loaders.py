"""portrait.core.loaders: explicit paths, ControlNet and inpaint pipelines, weight sharing,
schedulers, pickle checks and the shipped single-file config folders."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from portrait.core import loaders
from portrait.core.errors import BadInput, ModelMissing
from portrait.core.registry import ModelSpec, ResolvedModel


def _run(pipe, **kw):
    return pipe("a portrait photo", num_inference_steps=2, height=64, width=64, guidance_scale=5.0,
                generator=torch.Generator().manual_seed(1), output_type="np", **kw).images[0]


@pytest.fixture()
def control(astronaut):
    return Image.fromarray(astronaut).resize((64, 64))


@pytest.fixture()
def mask():
    m = Image.new("L", (64, 64), 0)
    m.paste(255, (20, 12, 44, 40))
    return m


def test_txt2img_uses_the_preset_base(ctx):
    pipe = loaders.load_pipeline(ctx)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    # the sd15 preset's VAE role (sd-vae-ft-mse -> tiny-sd15-vae) replaces the base's own
    assert pipe.vae is loaders.load_vae(ctx, "sd-vae-ft-mse")
    assert _run(pipe).shape == (64, 64, 3)


def test_switching_kind_reuses_the_loaded_weights(ctx):
    txt = loaders.load_pipeline(ctx, kind="txt2img")
    loads = ctx.cache.loads
    inpaint = loaders.load_pipeline(ctx, kind="inpaint")
    img2img = loaders.load_pipeline(ctx, kind="img2img", controlnets=["controlnet-canny-sd15"])
    assert type(inpaint).__name__ == "StableDiffusionInpaintPipeline"
    assert type(img2img).__name__ == "StableDiffusionControlNetImg2ImgPipeline"
    assert inpaint.unet is txt.unet and img2img.unet is txt.unet
    assert inpaint.text_encoder is txt.text_encoder and inpaint.vae is txt.vae
    assert inpaint.scheduler is not txt.scheduler  # schedulers hold per-call state
    assert ctx.cache.loads == loads + 1  # only the ControlNet: no base reload
    assert loaders.load_pipeline(ctx, kind="inpaint") is inpaint


def test_inpaint_pipeline_with_a_dedicated_inpainting_model(ctx, control, mask):
    pipe = loaders.load_pipeline(ctx, "sd15-inpaint", kind="inpaint")
    assert pipe.unet.config.in_channels == 9
    out = _run(pipe, image=control, mask_image=mask, strength=1.0)
    assert out.shape == (64, 64, 3) and np.isfinite(out).all()


def test_controlnet_inpaint_with_two_controlnets(ctx, control, mask):
    from diffusers.models import MultiControlNetModel

    pipe = loaders.load_pipeline(ctx, kind="inpaint", controlnets=["controlnet-canny-sd15", "controlnet-tile-sd15"])
    assert type(pipe).__name__ == "StableDiffusionControlNetInpaintPipeline"
    assert isinstance(pipe.controlnet, MultiControlNetModel)
    full = _run(pipe, image=control, mask_image=mask, control_image=[control, control], strength=0.75,
                controlnet_conditioning_scale=[1.0, 1.0])
    off = _run(pipe, image=control, mask_image=mask, control_image=[control, control], strength=0.75,
               controlnet_conditioning_scale=[0.0, 0.0])
    assert full.shape == (64, 64, 3)
    assert np.abs(full - off).max() > 1e-4


def test_sdxl_controlnet_pipeline_with_the_identitynet(ctx, control):
    pipe = loaders.load_pipeline(ctx, "sdxl", controlnets=["instantid-controlnet"], family="sdxl")
    assert type(pipe).__name__ == "StableDiffusionXLControlNetPipeline"
    assert pipe.controlnet.config.cross_attention_dim == pipe.unet.config.cross_attention_dim
    assert _run(pipe, image=control).shape == (64, 64, 3)


def test_a_controlnet_of_the_other_family_is_refused(ctx):
    with pytest.raises(BadInput, match="same family"):
        loaders.load_pipeline(ctx, "sdxl", controlnets=["controlnet-canny-sd15"], family="sdxl")


def test_explicit_single_file_base(ctx, tiny_home):
    path = tiny_home.models_dir / "tiny-sd15-single" / "tiny-sd15.safetensors"
    pipe = loaders.load_pipeline(ctx, "sd15-single", base_path=path)
    assert loaders.load_components(ctx, "sd15-single", base_path=path).source == path
    assert _run(pipe).shape == (64, 64, 3)


def test_explicit_path_errors_are_one_line(ctx, tmp_path):
    with pytest.raises(BadInput, match="no such file"):
        loaders.load_pipeline(ctx, "sd15-single", base_path=tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(BadInput) as err:
        loaders.load_pipeline(ctx, "sd15-single", base_path=junk)
    assert "\n" not in str(err.value) and "sd15-single" in str(err.value)


def test_a_missing_tiny_model_is_written_on_first_use(tmp_path, capfd):
    from portrait.core.config import Settings
    from portrait.core.context import RunContext
    from portrait.core.tiny import STAMP, TINY_VERSION

    empty = RunContext.create(Settings(home=tmp_path, preset="tiny", device="cpu"), preset="tiny")
    pipe = loaders.load_pipeline(empty)
    assert pipe.unet is not None
    written = sorted(p.name for p in (tmp_path / "models").iterdir())
    assert "tiny-sd15" in written and "tiny-sdxl" not in written, written  # what was used, not every stand-in
    err = capfd.readouterr().err
    assert err.count("tiny preset: writing offline stand-in models") == 1, err
    # a stale stand-in (older make-tiny shapes) is replaced, not loaded
    (tmp_path / "models" / "tiny-sd15" / STAMP).write_text("0")
    loaders.load_pipeline(RunContext.create(Settings(home=tmp_path, preset="tiny", device="cpu"), preset="tiny"))
    assert (tmp_path / "models" / "tiny-sd15" / STAMP).read_text() == TINY_VERSION


def test_a_missing_real_model_names_its_download_command(tmp_path):
    from portrait.core.config import Settings
    from portrait.core.context import RunContext

    real = RunContext.create(Settings(home=tmp_path, preset="sd15", device="cpu"), preset="sd15")
    with pytest.raises(ModelMissing, match="portrait models download sd15"):
        loaders.load_pipeline(real)


@pytest.mark.parametrize("name", sorted(n for n, c in loaders.SCHEDULERS.items() if "sd15" in c.families))
def test_schedulers_by_name(ctx, name):
    pipe = loaders.load_pipeline(ctx)
    loaders.set_scheduler(pipe, name)
    assert type(pipe.scheduler).__name__ == loaders.SCHEDULERS[name].cls
    assert pipe.scheduler.config.num_train_timesteps == 1000  # built from the model's config
    if name.endswith("karras"):
        assert pipe.scheduler.config.use_karras_sigmas
    assert np.isfinite(_run(pipe)).all()


def test_sampler_labels_and_unknown_names():
    assert loaders.sampler_label("dpmpp_2m_karras") == ("DPM++ 2M", "Karras")
    assert loaders.sampler_label("euler_a") == ("Euler a", "")
    with pytest.raises(BadInput, match="unknown sampler"):
        loaders.make_scheduler("heun_turbo", {})


def _spec_with_hash(name: str, digest: str) -> ModelSpec:
    return ModelSpec(id="some-adapter", kind="ip-adapter", files=[name], sha256={name: digest}, pickle=True)


def test_pickles_are_hash_checked_then_loaded_weights_only(ctx, tmp_path):
    from portrait.core.io import sha256_file

    path = tmp_path / "ip-adapter.bin"
    torch.save({"image_proj": {"proj.weight": torch.ones(2, 2)}}, path)
    good = ResolvedModel(_spec_with_hash(path.name, sha256_file(path)), tmp_path, "home", (path.name,))
    state = loaders.load_torch_file(ctx, good, path.name)
    assert torch.equal(state["image_proj"]["proj.weight"], torch.ones(2, 2))
    bad = ResolvedModel(_spec_with_hash(path.name, "0" * 64), tmp_path, "home", (path.name,))
    with pytest.raises(BadInput, match="sha256"):
        loaders.load_torch_file(ctx, bad, path.name)
    evil = tmp_path / "evil.bin"
    torch.save({"x": _NotATensor()}, evil)
    unchecked = ResolvedModel(ModelSpec(id="x", kind="x", files=[evil.name]), tmp_path, "home", (evil.name,))
    with pytest.raises(BadInput, match="weights-only"):
        loaders.load_torch_file(ctx, unchecked, evil.name)


class _NotATensor:
    """Arbitrary pickled objects must not load (weights_only=True)."""


@pytest.mark.parametrize("family,params", [("sd15", (859_520_964, 123_060_480, None)),
                                           ("sdxl", (2_567_463_684, 123_060_480, 694_659_840))])
def test_shipped_configs_describe_the_real_models(ctx, family, params):
    """The shipped folders build the real architectures (checked by parameter count on the meta
    device) and come with the real tokenizers, so from_single_file needs no hub."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    folder = loaders.single_file_config(ctx, None, family)
    assert folder == loaders.single_file_config(ctx, None, family)  # made once, then reused
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        te = CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))
    assert sum(p.numel() for p in unet.parameters()) == params[0]
    assert sum(p.numel() for p in te.parameters()) == params[1]
    if params[2]:
        with init_empty_weights():
            te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder / "text_encoder_2"))
        assert sum(p.numel() for p in te2.parameters()) == params[2]
        assert CLIPTokenizer.from_pretrained(folder / "tokenizer_2").pad_token == "!"
    assert CLIPTokenizer.from_pretrained(folder / "tokenizer")("a photo of a cat").input_ids == \
        [49406, 320, 1125, 539, 320, 2368, 49407]
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == ("StableDiffusionXLPipeline" if family == "sdxl" else "StableDiffusionPipeline")


def test_shipped_controlnet_config_is_controlnet_v11(ctx):
    from accelerate import init_empty_weights
    from diffusers import ControlNetModel

    folder = loaders.single_file_config(ctx, None, "sd15", name="configs/controlnet-sd15")
    with init_empty_weights():
        net = ControlNetModel.from_config(ControlNetModel.load_config(folder))
    unet = json.loads((loaders.single_file_config(ctx, None, "sd15") / "unet" / "config.json").read_text())
    for key in ("block_out_channels", "layers_per_block", "attention_head_dim", "cross_attention_dim", "down_block_types"):
        assert list(np.atleast_1d(net.config[key])) == list(np.atleast_1d(unet[key])), key
    assert tuple(net.config.conditioning_embedding_out_channels) == (16, 32, 96, 256)  # a /8 hint encoder
    assert 361.0e6 < sum(p.numel() for p in net.parameters()) < 361.5e6  # "361M" as published
