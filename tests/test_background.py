"""Background whitening of training photos: the registry's U^2-Net segmenter (tiny stand-in
in the real ONNX format), optional per preset, recorded in the report."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from portrait.core.errors import BadInput
from portrait.stages import background as bg


def test_registry_entry_is_rembgs_u2net_with_its_license(ctx):
    spec = ctx.registry.get("u2net")
    assert spec.license == "Apache-2.0" and spec.files == ["u2net.onnx"] and spec.size == 175997641
    assert spec.sha256["u2net.onnx"].startswith("8d10d2f3")
    assert ctx.preset.model("background_segmenter") == "u2net"


def test_tiny_segmenter_whitens_what_it_calls_background(ctx):
    """The tiny stand-in calls reddish pixels foreground: the red half stays, the blue half turns white."""
    seg = bg.load_segmenter(ctx, "u2net")
    assert seg.model_id == "tiny-u2net" and bg.load_segmenter(ctx, "u2net") is seg  # cached
    image = np.zeros((96, 128, 3), np.uint8)
    image[:, :64] = (200, 40, 40)
    image[:, 64:] = (30, 60, 200)
    mask = seg.mask(image)
    assert mask.shape == (96, 128) and mask[:, :56].min() > 0.9 and mask[:, 72:].max() < 0.1
    out = bg.whiten(image, mask)
    assert np.abs(out[:, :56].astype(int) - image[:, :56]).max() <= 26
    assert out[:, 72:].min() >= 229  # near white
    with pytest.raises(BadInput, match="whiten_background: input should be a valid boolean"):
        bg.BackgroundPolicy.from_section({"whiten_background": "yes"})


def test_prepare_whitens_training_crops_only_when_asked(tiny_home, tmp_path):
    from portrait.flows.prepare import prepare
    from portrait.samples import write_sample_photos

    write_sample_photos(tmp_path / "in", bad_file=False)
    plain = prepare([tmp_path / "in"], tmp_path / "plain", settings=tiny_home)
    white = prepare([tmp_path / "in"], tmp_path / "white", settings=tiny_home, whiten_background=True)
    assert "background" not in json.loads((tmp_path / "plain" / "report.json").read_text())
    report = json.loads((tmp_path / "white" / "report.json").read_text())
    assert report["background"] == {"whitened": True, "model": "tiny-u2net", "license": "test-only"}
    a = [np.asarray(Image.open(p).convert("RGB")) for p in plain.training_set.images]
    b = [np.asarray(Image.open(p).convert("RGB")) for p in white.training_set.images]
    assert len(a) == len(b) > 0
    # brighter overall (the background went white) and never darker anywhere
    assert all(y.astype(int).mean() > x.astype(int).mean() for x, y in zip(a, b))
    assert all((y.astype(int) - x >= -1).all() for x, y in zip(a, b))
