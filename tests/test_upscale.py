"""Super-resolution: ncnn import of the real Real-ESRGAN weights, tiling, blending, bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from portrait.core.errors import BadInput
from portrait.stages import upscale as up

FINISH_MODELS = ("tiny-esrgan-x4", "tiny-esrgan-x2", "tiny-clip")






def _resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize(size, Image.BICUBIC))


def _laplacian_variance(image: np.ndarray) -> float:
    import cv2

    return float(cv2.Laplacian(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), cv2.CV_64F).var())


def test_tiny_upscalers_load_through_spandrel_as_esrgan(finish_ctx):
    x4 = up.load_model(finish_ctx, "realesrgan-x4plus")
    x2 = up.load_model(finish_ctx, "realesrgan-x2plus")
    assert (x4.architecture.id, x4.scale) == ("ESRGAN", 4)
    assert (x2.architecture.id, x2.scale) == ("ESRGAN", 2)
    assert "unshuffle" in x2.tags
    assert up.load_model(finish_ctx, "realesrgan-x4plus") is x4  # cached, loaded once


def test_tiny_makers_are_deterministic(tmp_path):
    from portrait.core.io import sha256_file
    from portrait.core.tiny.finish import write_esrgan_x2

    write_esrgan_x2(tmp_path / "a", 7)
    write_esrgan_x2(tmp_path / "b", 7)
    write_esrgan_x2(tmp_path / "c", 8)
    name = "RealESRGAN_x2plus.pth"
    assert sha256_file(tmp_path / "a" / name) == sha256_file(tmp_path / "b" / name)
    assert sha256_file(tmp_path / "a" / name) != sha256_file(tmp_path / "c" / name)


def test_every_finishing_maker_is_byte_deterministic(tmp_path):
    import hashlib

    from portrait.core.config import Settings
    from portrait.core.registry import make_tiny

    def hashes(home):
        settings = Settings(home=home, preset="tiny", device="cpu")
        make_tiny(settings, only=FINISH_MODELS + ("tiny-face-parser", "tiny-inswapper"))
        return {str(p.relative_to(home)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted((home / "models").rglob("*")) if p.is_file()}

    first, second = hashes(tmp_path / "a"), hashes(tmp_path / "b")
    assert len(first) >= 10 and first == second


def test_tiled_and_untiled_upscaling_agree(finish_ctx, astronaut):
    model = up.load_model(finish_ctx, "realesrgan-x4plus")
    small = _resize(astronaut, (60, 44))  # not a multiple of the tile: ragged edge tiles
    whole = up.upscale(small, model, up.UpscalePolicy(outscale=4, blend=1.0, tile=0))
    tiled = up.upscale(small, model, up.UpscalePolicy(outscale=4, blend=1.0, tile=24, overlap=20))
    assert tiled.tiles == 6 and whole.tiles == 1
    assert tiled.image.shape == whole.image.shape == (176, 240, 3)
    diff = np.abs(tiled.image.astype(int) - whole.image.astype(int))
    # measured: max 1 level (rounding), the RRDB's receptive field fits in the overlap
    assert diff.max() <= 2, diff.max()
    # without context the tile borders do differ: the overlap is what makes them agree
    bare = up.upscale(small, model, up.UpscalePolicy(outscale=4, blend=1.0, tile=24, overlap=0))
    assert np.abs(bare.image.astype(int) - whole.image.astype(int)).max() > diff.max()


def test_blend_and_outscale(finish_ctx, astronaut):
    import cv2

    model = up.load_model(finish_ctx, "realesrgan-x4plus")
    small = _resize(astronaut, (64, 48))
    plain = up.upscale(small, model, up.UpscalePolicy(outscale=2, blend=0.0))
    assert plain.image.shape == (96, 128, 3) and plain.model_scale == 4
    assert np.array_equal(plain.image, cv2.resize(small, (128, 96), interpolation=cv2.INTER_LANCZOS4))
    half = up.upscale(small, model, up.UpscalePolicy(outscale=2, blend=0.5)).image.astype(int)
    full = up.upscale(small, model, up.UpscalePolicy(outscale=2, blend=1.0)).image.astype(int)
    assert np.abs(half - (plain.image.astype(int) + full) / 2).max() <= 1


def test_bad_inputs_are_one_line_exit_2(finish_ctx):
    model = up.load_model(finish_ctx, "realesrgan-x2plus")
    with pytest.raises(BadInput, match=r"^tiny\.png: image is 1x1") as err:
        up.upscale(np.zeros((1, 1, 3), np.uint8), model, up.UpscalePolicy(), source="tiny.png")
    assert err.value.exit_code == 2
    policy = up.UpscalePolicy(outscale=4, max_output_pixels=1_000_000)
    with pytest.raises(BadInput, match=r"^big\.png: 400x300 upscaled x4 would be 2 MP"):
        up.upscale(np.zeros((300, 400, 3), np.uint8), model, policy, source="big.png")
    with pytest.raises(BadInput, match="not an HxWx3 uint8"):
        up.upscale(np.zeros((8, 8), np.float32), model, up.UpscalePolicy())


def test_large_image_is_tiled_not_refused(finish_ctx):
    """A picture bigger than one tile runs in bounded memory: many small model calls."""
    model = up.load_model(finish_ctx, "realesrgan-x2plus")
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (130, 200, 3), dtype=np.uint8)
    result = up.upscale(image, model, up.UpscalePolicy(outscale=2, tile=64, overlap=8))
    assert result.image.shape == (260, 400, 3) and result.tiles == 3 * 4


def test_restorer_is_skipped_with_a_reason_under_tiny(finish_ctx):
    restorer, reason = up.try_load_restorer(finish_ctx, "gfpgan-v1.4")
    assert restorer is None and "gfpgan-v1.4" in reason


def test_restore_faces_pastes_only_around_the_face(hopper):
    """Paste-back geometry with a scale-1 spandrel model (a tiny Compact restorer)."""
    import spandrel
    import torch
    from spandrel.architectures.Compact import Compact

    from portrait.core.types import FaceObservation

    torch.manual_seed(0)
    net = Compact(num_in_ch=3, num_out_ch=3, num_feat=8, num_conv=2, upscale=1)
    descriptor = spandrel.ModelLoader().load_from_state_dict(net.state_dict()).eval()
    kps = np.array([[230, 220], [310, 220], [270, 260], [240, 300], [300, 300]], np.float32)
    face = FaceObservation(box=(180, 150, 360, 360), score=1.0, kps=kps, embedding=None, backend="dlib")
    out = up.restore_faces(hopper, [face], descriptor, weight=1.0)
    assert out.shape == hopper.shape
    assert not np.array_equal(out[200:300, 220:320], hopper[200:300, 220:320])
    assert np.array_equal(out[:60], hopper[:60]) and np.array_equal(out[:, :100], hopper[:, :100])
    assert np.array_equal(up.restore_faces(hopper, [face], descriptor, weight=0.0), hopper)


# --- the real Real-ESRGAN x4plus, converted from the ncnn wheel ------------------------------


def test_ncnn_conversion_gives_the_rrdbnet_state_dict():
    import spandrel

    from portrait.core import ncnn

    folder = ncnn.wheel_models_dir()
    state = ncnn.convert(folder / "realesrgan-x4plus.param", folder / "realesrgan-x4plus.bin")
    assert len(state) == 702  # 351 convolutions x (weight, bias)
    assert tuple(state["conv_first.weight"].shape) == (64, 3, 3, 3)
    assert tuple(state["body.22.rdb3.conv5.weight"].shape) == (64, 192, 3, 3)
    assert tuple(state["conv_last.weight"].shape) == (3, 64, 3, 3)
    model = spandrel.ModelLoader().load_from_state_dict(state)
    assert (model.architecture.id, model.scale) == ("ESRGAN", 4)
    assert {"64nf", "23nb"} <= set(model.tags)


def test_ncnn_rejects_a_file_that_is_not_ncnn(tmp_path):
    from portrait.core import ncnn

    bad = tmp_path / "x.param"
    bad.write_text("hello\n")
    with pytest.raises(BadInput, match=r"x\.param: not an ncnn \.param file"):
        ncnn.convert(bad, tmp_path / "x.bin")


def test_import_ncnn_cli_makes_the_registry_resolve_the_real_model(tmp_path):
    from portrait.cli.main import run
    from portrait.core.config import Settings
    from portrait.core.io import sha256_file
    from portrait.core.registry import Registry, verify

    home = tmp_path / "home"
    assert run(["--home", str(home), "models", "import-ncnn"]) == 0
    settings = Settings(home=home, preset="sd15", device="cpu")
    resolved = Registry.load().resolve("realesrgan-x4plus", settings)
    assert resolved.origin == "home" and resolved.path.name == "RealESRGAN_x4plus.pth"
    record = json.loads((resolved.root / "IMPORTED.json").read_text())
    assert record["sha256"] == sha256_file(resolved.path)
    assert [row.status for row in verify(resolved.spec, resolved.root)] == ["imported"]
    first = sha256_file(resolved.path)
    assert run(["--home", str(home), "models", "import-ncnn"]) == 0
    assert sha256_file(resolved.path) == first  # the conversion is byte-for-byte repeatable
    assert run(["--home", str(home), "models", "import-ncnn", "no-such-model"]) == 2
    from portrait.core.context import RunContext

    model = up.load_model(RunContext.create(settings, preset="sd15"), "realesrgan-x4plus")
    assert (model.architecture.id, model.scale) == ("ESRGAN", 4)
    with open(resolved.path, "r+b") as fh:  # a tampered file is refused, not unpickled
        fh.seek(-8, 2)
        fh.write(b"\0" * 8)
    with pytest.raises(BadInput, match="does not match the hash recorded by its ncnn import"):
        up.load_model(RunContext.create(settings, preset="sd15"), "realesrgan-x4plus")


@pytest.mark.slow
def test_real_x4plus_restores_sharpness_of_a_real_photo(tmp_path, astronaut):
    """Astronaut 512 -> 128 -> x4: PSNR near bicubic, sharpness near the original's."""
    from skimage.metrics import peak_signal_noise_ratio

    from portrait.core import ncnn
    from portrait.core.config import Settings
    from portrait.core.context import RunContext

    settings = Settings(home=tmp_path, preset="sd15", device="cpu")
    ncnn.import_from_wheel(settings.models_dir)
    ctx = RunContext.create(settings, preset="sd15")
    model = up.load_model(ctx, "realesrgan-x4plus")
    small = _resize(astronaut, (128, 128))
    sr = up.upscale(small, model, up.UpscalePolicy(outscale=4, blend=1.0, tile=0)).image
    bicubic = _resize(small, (512, 512))
    psnr_sr = peak_signal_noise_ratio(astronaut, sr)
    psnr_bicubic = peak_signal_noise_ratio(astronaut, bicubic)
    sharp_sr, sharp_bicubic, sharp_original = (_laplacian_variance(x) for x in (sr, bicubic, astronaut))
    print(f"PSNR sr {psnr_sr:.2f} bicubic {psnr_bicubic:.2f}; Laplacian var sr {sharp_sr:.0f} "
          f"bicubic {sharp_bicubic:.0f} original {sharp_original:.0f}")
    assert psnr_sr >= psnr_bicubic - 2.5
    assert abs(sharp_sr - sharp_original) <= 0.3 * sharp_original
    assert sharp_sr > 5 * sharp_bicubic
    # The real RRDB sees ~350 px around each pixel, so tiles cannot match exactly (Real-ESRGAN's
    # own tiler has the same property); with 16 px of context they agree to well over 40 dB.
    crop = small[32:96, 32:96]
    whole = up.upscale(crop, model, up.UpscalePolicy(outscale=4, blend=1.0, tile=0)).image
    tiled = up.upscale(crop, model, up.UpscalePolicy(outscale=4, blend=1.0, tile=32, overlap=16)).image
    agreement = peak_signal_noise_ratio(whole, tiled)
    print(f"tiled vs untiled: {agreement:.1f} dB, max diff {np.abs(whole.astype(int) - tiled).max()}")
    assert agreement > 40


@pytest.mark.slow
def test_gfpgan_restorer_runs_through_spandrel_at_full_size(hopper):
    """GFPGAN has no tiny form: a randomly initialised full-size one checks the [-1, 1] call path."""
    import spandrel
    import torch
    from spandrel.architectures.GFPGAN import GFPGAN

    from portrait.core.types import FaceObservation

    torch.manual_seed(0)
    net = GFPGAN(out_size=512, num_style_feat=512, channel_multiplier=2, decoder_load_path=None, fix_decoder=False,
                 num_mlp=8, input_is_latent=True, different_w=True, narrow=1, sft_half=True)
    descriptor = spandrel.ModelLoader().load_from_state_dict(net.state_dict()).eval()
    assert descriptor.architecture.id == "GFPGAN" and descriptor.scale == 1
    kps = np.array([[230, 220], [310, 220], [270, 260], [240, 300], [300, 300]], np.float32)
    face = FaceObservation(box=(180, 150, 360, 360), score=1.0, kps=kps, embedding=None, backend="dlib")
    out = up.restore_faces(hopper, [face], descriptor, weight=0.5)
    assert out.shape == hopper.shape
    assert np.abs(out[220:300, 230:310].astype(int) - hopper[220:300, 230:310]).mean() > 1
    assert np.array_equal(out[:60], hopper[:60])
