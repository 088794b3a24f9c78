"""Skin retouch on a real photo (Grace Hopper): smoother skin, nothing else touched."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from portrait.core.errors import BadInput
from portrait.stages.retouch import RetouchPolicy, retouch, skin_mask


@pytest.fixture(scope="module")
def hopper_face(tmp_path_factory, hopper):
    from portrait.core.config import Settings
    from portrait.core.faces import make_analyzer
    from portrait.core.registry import Registry

    settings = Settings(home=tmp_path_factory.mktemp("retouch-home"), preset="tiny", device="cpu")
    analyzer = make_analyzer(registry=Registry.load(), settings=settings, backend="dlib")
    face = analyzer.detect(hopper)[0]
    assert face.landmarks is not None and len(face.landmarks) == 68
    return face


def _high_frequency(image: np.ndarray) -> np.ndarray:
    import cv2

    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)
    return np.abs(cv2.Laplacian(gray, cv2.CV_32F))


def test_retouch_smooths_skin_and_leaves_the_rest(hopper, hopper_face):
    original = hopper.copy()
    result = retouch(hopper, [hopper_face], RetouchPolicy(strength=0.5))
    assert np.array_equal(hopper, original)  # input untouched
    inside = result.mask > 0
    before, after = _high_frequency(hopper)[inside].mean(), _high_frequency(result.image)[inside].mean()
    print(f"skin high-frequency energy: {before:.2f} -> {after:.2f}")  # measured 19.7 -> 16.1
    assert after < 0.9 * before
    assert np.array_equal(result.image[~inside], hopper[~inside])
    stronger = retouch(hopper, [hopper_face], RetouchPolicy(strength=1.0)).image
    assert _high_frequency(stronger)[inside].mean() < after


def test_skin_mask_excludes_eyes_brows_and_lips(hopper, hopper_face):
    mask = skin_mask(hopper.shape, [hopper_face], RetouchPolicy())
    points = hopper_face.landmarks

    def at(p):
        x, y = np.round(p).astype(int)
        return mask[y, x]

    assert at(points[36:42].mean(0)) == 0 and at(points[42:48].mean(0)) == 0  # eyes
    assert at(points[19]) == 0 and at(points[24]) == 0  # brows
    assert at(points[[51, 57]].mean(0)) == 0  # lips
    assert at(0.6 * points[31] + 0.4 * points[3]) > 0.5  # cheek
    assert at(points[[27, 30]].mean(0)) > 0.5  # nose bridge
    assert mask[: int(hopper_face.box[1]) - 40].max() == 0  # nothing up in the cap


def test_five_point_mask_when_no_landmarks(hopper, hopper_face):
    bare = dataclasses.replace(hopper_face, landmarks=None)
    mask = skin_mask(hopper.shape, [bare], RetouchPolicy())
    for eye in bare.kps[:2]:
        x, y = np.round(eye).astype(int)
        assert mask[y, x] == 0
    assert 0.03 < (mask > 0).mean() < 0.2
    result = retouch(hopper, [bare], RetouchPolicy(strength=0.7))
    assert np.array_equal(result.image[mask == 0], hopper[mask == 0])


def test_zero_strength_and_no_face_change_nothing(hopper, hopper_face):
    assert np.array_equal(retouch(hopper, [hopper_face], RetouchPolicy(strength=0.0)).image, hopper)
    assert np.array_equal(retouch(hopper, [], RetouchPolicy(strength=1.0)).image, hopper)


def test_bad_inputs(hopper_face):
    with pytest.raises(BadInput, match=r"^a\.png: image is 1x1"):
        retouch(np.zeros((1, 1, 3), np.uint8), [], RetouchPolicy(), source="a.png")
    with pytest.raises(BadInput, match="strength"):
        RetouchPolicy.from_section({"strength": 3})
    with pytest.raises(BadInput, match="skin mask is 2x2"):
        retouch(np.zeros((10, 10, 3), np.uint8), [], RetouchPolicy(), mask=np.zeros((2, 2), np.float32))


# --- face parsing (BiSeNet) masks ----------------------------------------------------------


@pytest.fixture(scope="module")
def parser_ctx(tmp_path_factory):
    from portrait.core.config import Settings
    from portrait.core.context import RunContext
    from portrait.core.registry import make_tiny

    settings = Settings(home=tmp_path_factory.mktemp("parser-home"), preset="tiny", device="cpu")
    make_tiny(settings, only=("tiny-face-parser", "tiny-esrgan-x4"))
    return RunContext.create(settings, preset="tiny")


def test_bisenet_has_the_published_layout_and_the_tiny_one_loads(parser_ctx, hopper, hopper_face):
    import torch

    from portrait.core.parsing import bisenet, load_face_parser

    real = bisenet().state_dict()
    assert {"cp.resnet.layer4.1.bn2.running_var", "cp.arm16.conv_atten.weight", "cp.arm32.bn_atten.bias",
            "cp.conv_avg.conv.weight", "ffm.convblk.conv.weight", "ffm.conv2.weight",
            "conv_out.conv_out.weight"} <= set(real)
    assert tuple(real["conv_out.conv_out.weight"].shape) == (19, 256, 1, 1)
    # the real file is 53,289,463 bytes: these fp32 tensors plus the two small auxiliary heads
    assert 52.5e6 < sum(v.numel() * 4 for v in real.values() if v.dtype == torch.float32) < 53.3e6
    torch.set_num_threads(1)
    parser = load_face_parser(parser_ctx, "face-parsing-bisenet")
    assert set(parser.network.state_dict()) == set(real)  # same names, tiny widths
    labels = parser.parse(hopper, [hopper_face])
    assert labels.shape == hopper.shape[:2] and labels.dtype == np.uint8 and labels.max() < 19
    assert labels[:20, :20].max() == 0  # outside the head crop: background


def test_a_checkpoint_that_is_not_bisenet_is_refused(parser_ctx, tmp_path):
    import shutil

    from portrait.core.config import Settings
    from portrait.core.context import RunContext
    from portrait.core.parsing import load_face_parser

    settings = Settings(home=tmp_path, preset="tiny", device="cpu")
    (settings.models_dir / "tiny-face-parser").mkdir(parents=True)
    shutil.copy(parser_ctx.resolve("realesrgan-x4plus").path, settings.models_dir / "tiny-face-parser" / "parsing_bisenet.pth")
    from portrait.core.tiny import STAMP, TINY_VERSION

    # A current stand-in folder (else the tiny preset rewrites it on first use) holding the wrong model.
    (settings.models_dir / "tiny-face-parser" / STAMP).write_text(TINY_VERSION)
    with pytest.raises(BadInput, match=r"parsing_bisenet\.pth: cannot be loaded as a BiSeNet face parser"):
        load_face_parser(RunContext.create(settings, preset="tiny"), "face-parsing-bisenet")


def test_parsed_skin_mask_excludes_hair_and_glasses(hopper, hopper_face):
    from portrait.core.facemask import face_regions

    regions = face_regions(hopper.shape, hopper_face)
    labels = np.where(regions.skin > 0, 1, 0).astype(np.uint8)
    top = int(hopper_face.landmarks[19, 1])
    labels[: top + 10][labels[: top + 10] == 1] = 17  # hair over the brows
    eyes = regions.eyes > 0
    labels[eyes] = 6  # glasses
    result = retouch(hopper, [hopper_face], RetouchPolicy(strength=1.0), parsing=labels)
    skin = np.isin(labels, (1, 10))
    assert result.mask[~skin].max() == 0
    assert np.array_equal(result.image[~skin], hopper[~skin])
    assert (result.mask[skin] > 0).mean() > 0.5


def test_fusion_keeps_parsed_glasses_and_hair_of_the_target(hopper, hopper_face, astronaut, tmp_path_factory):
    from portrait.core.config import Settings
    from portrait.core.faces import make_analyzer
    from portrait.core.registry import Registry
    from portrait.stages.fuse import FusePolicy, fuse

    settings = Settings(home=tmp_path_factory.mktemp("fuse-parse"), preset="tiny", device="cpu")
    astro = make_analyzer(registry=Registry.load(), settings=settings, backend="dlib").detect(astronaut)[0]
    labels = np.ones(hopper.shape[:2], np.uint8)  # all skin ...
    labels[: int(hopper_face.landmarks[19, 1]) - 5] = 17  # ... except hair above the brows
    result = fuse(astronaut, astro, hopper, hopper_face, FusePolicy(blend="feather"), target_parsing=labels)
    assert result.alpha[labels == 17].max() == 0
    assert np.array_equal(result.image[labels == 17], hopper[labels == 17])
