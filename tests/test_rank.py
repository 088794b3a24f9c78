"""Rank: consensus over all faces, face choice in group photos, reasons and the total score."""

from __future__ import annotations

import numpy as np

from portrait.core.faces import similarity_scale
from portrait.core.types import FaceObservation, Photo
from portrait.stages.analyze import FaceQuality, PhotoAnalysis
from portrait.stages.rank import RankPolicy, find_consensus, rank, total_score

GOOD = FaceQuality(sharpness=0.9, exposure=0.9, face_size=1.0, face_px=150, yaw=2, pitch=1, roll=0)
SCALE = similarity_scale("insightface:antelopev2")


def _face(embedding, size=100.0, x=0.0) -> FaceObservation:
    return FaceObservation(box=(x, 0.0, x + size, size), score=0.9, kps=np.zeros((5, 2), np.float32),
                           embedding=np.asarray(embedding, np.float32), backend="insightface:antelopev2")


def _photo(name, *faces, quality=GOOD) -> PhotoAnalysis:
    image = np.zeros((8, 8, 3), np.uint8)
    return PhotoAnalysis(Photo(name, image, name), tuple(faces), tuple(quality for _ in faces))


def _person(rng, base, noise=0.25):
    return base + rng.normal(0, noise, base.shape)


def test_majority_identity_wins_even_when_it_is_not_the_largest_face():
    rng = np.random.default_rng(0)
    alice, bob, carol = (rng.normal(0, 1, 64) for _ in range(3))
    photos = [_photo(f"a{i}", _face(_person(rng, alice))) for i in range(4)]
    # a group photo where alice is the smaller face and bob the largest
    photos.append(_photo("group", _face(_person(rng, bob), size=300), _face(_person(rng, alice), size=80, x=400)))
    photos.append(_photo("bob", _face(_person(rng, bob))))
    photos.append(_photo("carol", _face(_person(rng, carol))))
    ranking = rank(photos, SCALE, RankPolicy())
    status = {a.source: (a.status, a.reason) for a in ranking.assessments}
    assert status["bob"] == ("rejected", "other_person") and status["carol"] == ("rejected", "other_person")
    assert status["group"] == ("kept", None)
    group = next(a for a in ranking.assessments if a.source == "group")
    assert group.face.width == 80  # the matching face, not the largest
    assert SCALE(ranking.consensus, alice) > 0.9


def test_consensus_ignores_a_minority_even_with_many_faces_per_photo():
    rng = np.random.default_rng(1)
    me, crowd = rng.normal(0, 1, 64), [rng.normal(0, 1, 64) for _ in range(6)]
    photos = [_photo(f"me{i}", _face(_person(rng, me))) for i in range(3)]
    photos.append(_photo("crowd", *[_face(_person(rng, c)) for c in crowd]))
    assert SCALE(find_consensus(photos, SCALE), me) > 0.9


def test_reasons_follow_the_quality_checks():
    rng = np.random.default_rng(2)
    me = rng.normal(0, 1, 64)
    cases = {
        "ok": GOOD,
        "small": FaceQuality(0.9, 0.9, 0.2, 30, 0, 0, 0),
        "profile": FaceQuality(0.9, 0.9, 1.0, 150, 70, 0, 0),
        "dark": FaceQuality(0.05, 0.05, 1.0, 150, 0, 0, 0),
        "soft": FaceQuality(0.05, 0.9, 1.0, 150, 0, 0, 0),
    }
    photos = [_photo(name, _face(_person(rng, me, 0.1)), quality=q) for name, q in cases.items()]
    photos.append(_photo("empty"))
    got = {a.source: a.reason for a in rank(photos, SCALE).assessments}
    assert got == {"ok": None, "small": "face_too_small", "profile": "bad_pose", "dark": "bad_exposure",
                   "soft": "blurry", "empty": "no_face"}


def test_total_prefers_frontal_sharp_similar_faces():
    turned = FaceQuality(0.9, 0.9, 1.0, 150, 35, 0, 0)
    blurry = FaceQuality(0.2, 0.9, 1.0, 150, 0, 0, 0)
    assert total_score(0.9, GOOD) > total_score(0.9, turned)
    assert total_score(0.9, GOOD) > total_score(0.9, blurry)
    assert total_score(0.9, GOOD) > total_score(0.6, GOOD)
    assert 0.0 <= total_score(-0.3, GOOD) <= total_score(1.5, GOOD) <= 1.0


def test_top_k_and_reference_is_the_best_total():
    rng = np.random.default_rng(3)
    me = rng.normal(0, 1, 64)
    photos = [_photo(f"p{i}", _face(_person(rng, me, 0.1)), quality=FaceQuality(0.9, 0.9, 1.0, 150, yaw, 0, 0))
              for i, yaw in enumerate([30, 5, 20, 0, 10])]
    ranking = rank(photos, SCALE, RankPolicy(top_k=3))
    assert [a.source for a in ranking.kept] == ["p3", "p1", "p4"]
    assert ranking.reference.source == "p3"
    assert sum(a.status == "kept" for a in ranking.assessments) == 5


def test_real_photos_rank_with_dlib(tmp_path, astronaut, hopper):
    from pathlib import Path

    from portrait.core.config import Settings
    from portrait.core.faces import make_analyzer
    from portrait.core.registry import Registry
    from portrait.stages.analyze import analyze_photo

    analyzer = make_analyzer(None, "dlib", registry=Registry.load(), settings=Settings(home=Path(tmp_path)))
    import cv2
    from PIL import Image

    images = {"a": astronaut, "a_flip": np.ascontiguousarray(astronaut[:, ::-1]),
              "a_crop": np.ascontiguousarray(astronaut[20:380, 80:440]), "hopper": hopper,
              "a_small": np.asarray(Image.fromarray(astronaut).resize((250, 250), Image.Resampling.LANCZOS)),
              "a_blurred": cv2.GaussianBlur(astronaut, (0, 0), 3),
              "a_dark": (astronaut * 0.1).astype(np.uint8)}
    analyses = [analyze_photo(Photo(name, image, name), analyzer) for name, image in images.items()]
    ranking = rank(analyses, analyzer.scale)
    got = {a.source: a.reason for a in ranking.assessments}
    assert got == {"a": None, "a_flip": None, "a_crop": None, "hopper": "other_person", "a_small": "face_too_small",
                   "a_blurred": "blurry", "a_dark": "bad_exposure"}
    assert ranking.consensus.shape == (128,)
