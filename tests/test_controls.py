"""ControlNet preprocessors on real photos: canny, color, tile, openpose from landmarks, depth."""

from __future__ import annotations

import numpy as np
import pytest

from portrait.core.errors import BadInput, ModelMissing
from portrait.stages import controls as ctl


@pytest.fixture(scope="module")
def hopper_faces(tiny_home, hopper):
    from portrait.core.context import RunContext
    from portrait.core.faces import make_analyzer

    ctx = RunContext.create(tiny_home, preset="tiny")
    faces = make_analyzer(ctx, "dlib").detect(hopper, embed=False)
    assert len(faces) == 1
    return faces


def test_fit_crops_to_aspect_then_resizes(hopper):
    out = ctl.fit(hopper, 64, 80)
    assert out.shape == (80, 64, 3) and out.dtype == np.uint8
    wide = ctl.fit(hopper, 128, 64)
    assert wide.shape == (64, 128, 3)


def test_canny_is_white_edges_on_black(astronaut):
    edges = ctl.canny(astronaut)
    assert edges.shape == astronaut.shape
    assert set(np.unique(edges)) <= {0, 255}
    assert (edges[..., 0] == edges[..., 1]).all()
    frac = (edges[..., 0] > 0).mean()
    assert 0.01 < frac < 0.4  # a real photo has edges, but is not all edges
    flat = np.full_like(astronaut, 128)
    assert ctl.canny(flat).max() == 0


def test_color_map_is_a_blocky_palette(astronaut):
    color = ctl.color_map(astronaut, block=64)
    assert color.shape == astronaut.shape
    # 512 / 64 = 8 blocks per side: at most 64 distinct colours, each block constant
    assert len(np.unique(color.reshape(-1, 3), axis=0)) <= 64
    assert (color[:64, :64] == color[0, 0]).all()
    # the mosaic keeps the mean colour of the photo
    assert np.abs(color.mean((0, 1)) - astronaut.mean((0, 1))).max() < 6


def test_tile_is_the_image_or_a_softened_copy(astronaut):
    assert np.array_equal(ctl.tile(astronaut), astronaut)
    soft = ctl.tile(astronaut, blur=7)
    lap = lambda im: np.abs(np.diff(im.astype(np.float32), axis=1)).mean()  # noqa: E731
    assert lap(soft) < lap(astronaut)


def test_openpose_from_landmarks_marks_the_face(hopper, hopper_faces):
    face = hopper_faces[0]
    pose = ctl.openpose_from_faces(hopper_faces, hopper.shape[1], hopper.shape[0])
    assert pose.shape == hopper.shape
    lit = pose.max(axis=2) > 0
    assert lit.any()
    x1, y1, x2, y2 = (int(v) for v in face.box)
    # the face dots are white and sit inside the (slightly grown) face box
    white = (pose == 255).all(axis=2)
    ys, xs = np.nonzero(white)
    assert len(xs) > 50
    assert x1 - 10 <= np.median(xs) <= x2 + 10 and y1 - 10 <= np.median(ys) <= y2 + 10
    # the nose keypoint is drawn in OpenPose's first body colour (255, 0, 0)
    nx, ny = (int(round(v)) for v in face.kps[2])
    patch = pose[ny - 4 : ny + 5, nx - 4 : nx + 5].reshape(-1, 3)
    assert any((p == (255, 0, 0)).all() for p in patch)


def test_make_control_sizes_and_sources(ctx, hopper, hopper_faces):
    for name in ("canny", "tile", "color", "openpose"):
        made = ctl.make_control(name, hopper, 64, 80, 0.5, ctx=ctx, faces=hopper_faces)
        assert made.image.shape == (80, 64, 3) and made.image.dtype == np.uint8
        assert made.strength == 0.5
    assert ctl.make_control("openpose", hopper, 64, 80, 0.5, ctx=ctx, faces=hopper_faces).source == "landmarks"
    shipped = ctl.make_control("depth", hopper, 64, 80, 1.0, ctx=ctx, preprocessed=True)
    assert shipped.source == "shipped" and shipped.image.shape == (80, 64, 3)


def test_depth_without_annotator_is_a_clear_error(ctx, hopper):
    with pytest.raises(BadInput, match="annotator-midas"):
        ctl.make_control("depth", hopper, 64, 64, 1.0, ctx=ctx)
    with pytest.raises(BadInput, match="unknown control"):
        ctl.make_control("scribble", hopper, 64, 64, 1.0, ctx=ctx)


def test_real_preset_annotator_missing_names_the_download(tiny_home, hopper):
    from portrait.core.context import RunContext

    real = RunContext.create(tiny_home, preset="sd15")
    with pytest.raises(ModelMissing, match="portrait models download annotator-openpose"):
        ctl.make_control("openpose", hopper, 64, 64, 1.0, ctx=real)
    with pytest.raises(ModelMissing, match="annotator-midas"):
        ctl.make_control("depth", hopper, 64, 64, 1.0, ctx=real)


def test_unreadable_control_image_names_the_file(tmp_path):
    bad = tmp_path / "pose.png"
    bad.write_text("not an image")
    with pytest.raises(BadInput, match="pose.png"):
        ctl.read_rgb(bad)
