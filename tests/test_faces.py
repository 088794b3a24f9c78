"""Face analysis on real photos (dlib) and through insightface's classes (tiny ONNX packs)."""

from __future__ import annotations

import numpy as np
import pytest

from portrait.core.config import Settings
from portrait.core.context import RunContext
from portrait.core.errors import BadInput
from portrait.core.faces import (ARCFACE_TEMPLATE, DlibAnalyzer, InsightfaceAnalyzer, face_similarity, head_pose,
                                 make_analyzer, pick_backend, similarity)
from portrait.core.registry import Registry
from portrait.core.registry import make_tiny

PACKS = ["tiny-antelopev2", "tiny-buffalo_l"]


@pytest.fixture(scope="module")
def face_home(tmp_path_factory) -> Settings:
    settings = Settings(home=tmp_path_factory.mktemp("faces-home"), preset="tiny", device="cpu")
    make_tiny(settings, only=PACKS)
    return settings


@pytest.fixture(scope="module")
def dlib_analyzer(face_home):
    return make_analyzer(None, "dlib", registry=Registry.load(), settings=face_home)


def test_dlib_finds_the_astronaut_with_keypoints_in_insightface_order(dlib_analyzer, astronaut):
    faces = dlib_analyzer.detect(astronaut)
    assert len(faces) == 1
    face = faces[0]
    x1, y1, x2, y2 = face.box
    assert 150 < x1 < 220 and 60 < y1 < 120 and 70 < x2 - x1 < 120  # the face is at ~(179,83)-(266,170)
    left_eye, right_eye, nose, mouth_l, mouth_r = face.kps
    assert left_eye[0] < nose[0] < right_eye[0]
    assert mouth_l[0] < mouth_r[0] and min(mouth_l[1], mouth_r[1]) > nose[1] > max(left_eye[1], right_eye[1])
    assert face.embedding.shape == (128,) and face.backend == "dlib"
    assert face.landmarks is not None and face.landmarks.shape == (68, 2)


def test_dlib_similarity_is_calibrated_on_real_people(dlib_analyzer, astronaut, hopper):
    a = dlib_analyzer.detect(astronaut)[0]
    mirrored = dlib_analyzer.detect(np.ascontiguousarray(astronaut[:, ::-1]))[0]
    other = dlib_analyzer.detect(hopper)[0]
    same, different = face_similarity(a, mirrored), face_similarity(a, other)
    assert same > 0.9 > 0.1 > different
    assert same > dlib_analyzer.scale.threshold > different


def test_group_photo_faces_come_largest_first(dlib_analyzer, t1_group):
    faces = dlib_analyzer.detect(t1_group)
    assert len(faces) == 6
    areas = [f.area for f in faces]
    assert areas == sorted(areas, reverse=True)
    assert len(dlib_analyzer.detect(t1_group, max_faces=2)) == 2


def test_no_face_in_a_photo_of_coffee(dlib_analyzer):
    from skimage import data

    assert dlib_analyzer.detect(data.coffee()) == []


def test_head_pose_from_keypoints():
    yaw, pitch, roll = head_pose(ARCFACE_TEMPLATE)
    assert abs(yaw) < 1 and abs(pitch) < 1 and abs(roll) < 1
    turned = ARCFACE_TEMPLATE.copy()
    turned[2, 0] += 12  # nose moves toward the image right: the head turns
    yaw_r, _, _ = head_pose(turned)
    mirrored = ARCFACE_TEMPLATE.copy()
    mirrored[2, 0] -= 12
    yaw_l, _, _ = head_pose(mirrored)
    assert yaw_r > 20 and yaw_l < -20 and abs(yaw_r + yaw_l) < 0.1
    angle = np.radians(20)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    _, _, roll = head_pose(ARCFACE_TEMPLATE @ rot.T)
    assert roll == pytest.approx(20, abs=1.0)


def test_similarity_per_space():
    a = np.array([1.0, 0.0, 0.0], np.float32)
    b = np.array([0.0, 1.0, 0.0], np.float32)
    assert similarity(a, a * 3, "insightface:antelopev2") == pytest.approx(1.0)
    assert similarity(a, b, "insightface:buffalo_l") == pytest.approx(0.0)
    assert similarity(a, a, "dlib") > 0.99 and similarity(a, b, "dlib") < 0.01  # distance 1.41


def test_tiny_packs_are_deterministic(tmp_path):
    from portrait.core.tiny.faces import write_antelopev2

    write_antelopev2(tmp_path / "a", 7)
    write_antelopev2(tmp_path / "b", 7)
    write_antelopev2(tmp_path / "c", 8)
    for name in ("scrfd_10g_bnkps.onnx", "glintr100.onnx", "genderage.onnx"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "glintr100.onnx").read_bytes() != (tmp_path / "c" / "glintr100.onnx").read_bytes()


def test_insightface_model_zoo_routes_the_tiny_pack(face_home):
    from insightface.model_zoo import get_model
    from insightface.model_zoo.arcface_onnx import ArcFaceONNX
    from insightface.model_zoo.attribute import Attribute
    from insightface.model_zoo.scrfd import SCRFD

    root = Registry.load().resolve("antelopev2", face_home, tiny=True).root
    kinds = {name: type(get_model(str(root / name), providers=["CPUExecutionProvider"]))
             for name in ("scrfd_10g_bnkps.onnx", "glintr100.onnx", "genderage.onnx")}
    assert kinds == {"scrfd_10g_bnkps.onnx": SCRFD, "glintr100.onnx": ArcFaceONNX, "genderage.onnx": Attribute}


@pytest.mark.parametrize("pack", ["antelopev2", "buffalo_l"])
def test_insightface_backend_end_to_end_on_tiny_pack(face_home, astronaut, pack):
    ctx = RunContext.create(face_home, preset="tiny")
    analyzer = make_analyzer(ctx, f"insightface:{pack}")
    assert isinstance(analyzer, InsightfaceAnalyzer)
    faces = analyzer.detect(astronaut)
    assert len(faces) == 1  # the tiny detector fires once per image
    face = faces[0]
    assert face.backend == f"insightface:{pack}" and face.embedding.shape == (512,)
    assert face.gender in ("male", "female") and 0 <= face.age <= 100
    assert face.kps.shape == (5, 2) and face.kps[0, 0] < face.kps[1, 0]
    again = analyzer.detect(astronaut)[0]
    assert np.array_equal(face.embedding, again.embedding)
    assert analyzer.detect(astronaut, embed=False)[0].embedding is None
    assert make_analyzer(ctx, f"insightface:{pack}") is analyzer  # cached in ctx.cache


def test_tiny_packs_are_different_embedding_spaces(face_home, astronaut):
    ctx = RunContext.create(face_home, preset="tiny")
    a = make_analyzer(ctx, "insightface:antelopev2").detect(astronaut)[0]
    b = make_analyzer(ctx, "insightface:buffalo_l").detect(astronaut)[0]
    assert not np.allclose(a.embedding, b.embedding)
    with pytest.raises(ValueError):
        face_similarity(a, b)


def test_auto_picks_dlib_without_real_packs_and_rejects_unknown(face_home):
    registry = Registry.load()
    assert pick_backend("auto", registry, face_home) == "dlib"
    assert isinstance(make_analyzer(RunContext.create(face_home, preset="tiny"), "auto"), DlibAnalyzer)
    with pytest.raises(BadInput):
        pick_backend("mediapipe", registry, face_home)


def test_rgb_input_is_required(dlib_analyzer):
    with pytest.raises(ValueError):
        dlib_analyzer.detect(np.zeros((64, 64), np.uint8))


def test_dlib_without_the_non_commercial_68_point_model(face_home, dlib_analyzer, astronaut):
    cc0_only = make_analyzer(None, "dlib", registry=Registry.load(), settings=face_home, landmarks68=False)
    face, full = cc0_only.detect(astronaut)[0], dlib_analyzer.detect(astronaut)[0]
    assert face.landmarks is None
    assert np.array_equal(face.embedding, full.embedding)  # the descriptor always uses the 5-point shape
    assert np.abs(face.kps[:3] - full.kps[:3]).max() < 12  # eyes and nose agree; mouth is estimated
    assert face.kps[3, 1] > face.kps[2, 1] and face.kps[3, 0] < face.kps[4, 0]


@pytest.mark.slow
def test_dlib_cnn_detector(face_home, astronaut):
    cnn = make_analyzer(None, "dlib", registry=Registry.load(), settings=face_home, detector="cnn", max_side=384)
    faces = cnn.detect(astronaut)
    assert len(faces) == 1 and 150 < faces[0].box[0] < 220 and faces[0].embedding.shape == (128,)
