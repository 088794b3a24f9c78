"""Captions from attributes: with insightface, gender and age pick the class word; with dlib
(no attributes) the preset's class word is used."""

from __future__ import annotations

import numpy as np
import pytest

from portrait.core.types import FaceObservation
from portrait.stages.caption import CaptionPolicy, caption, class_word_for

WORDS = {"boy", "girl", "man", "woman", "old man", "old woman"}


def _face(gender, age) -> FaceObservation:
    return FaceObservation(box=(0.0, 0.0, 10.0, 10.0), score=1.0, kps=np.zeros((5, 2), np.float32), embedding=None,
                           backend="insightface:buffalo_l", gender=gender, age=age)


@pytest.mark.parametrize("gender,age,word", [("male", 8, "boy"), ("female", 17.9, "girl"), ("male", 30, "man"),
                                             ("female", 59, "woman"), ("male", 60, "old man"),
                                             ("female", 81, "old woman"), ("female", None, "woman"),
                                             (None, 30, None)])
def test_class_word_from_gender_and_age(gender, age, word):
    assert class_word_for(_face(gender, age)) == word


def test_majority_vote_and_the_presets_word_without_attributes():
    policy = CaptionPolicy(trigger="ohwx", class_word="person")
    votes = [_face("female", 30), _face("male", 30), _face("female", 40)]
    assert caption(votes, policy).texts == ("a photo of ohwx woman",) * 3
    assert caption([_face(None, None)] * 2, policy).class_word == "person"


@pytest.fixture(scope="module")
def attr_home(tmp_path_factory):
    from portrait.core.config import Settings
    from portrait.core.registry import make_tiny

    settings = Settings(home=tmp_path_factory.mktemp("caption-home"), preset="tiny", device="cpu")
    make_tiny(settings, only=["tiny-buffalo_l"])
    return settings


def test_insightface_path_takes_the_class_word_from_genderage(attr_home, astronaut, hopper, t1_group):
    """The tiny buffalo_l pack's genderage.onnx (insightface's Attribute model format) gives
    each face a gender and an age; the caption's class word is their vote, not the default."""
    from portrait.core.context import RunContext
    from portrait.core.faces import make_analyzer

    ctx = RunContext.create(attr_home, preset="tiny")
    analyzer = make_analyzer(ctx, "insightface:buffalo_l")
    faces = [analyzer.detect(image)[0] for image in (astronaut, hopper, t1_group)]
    assert all(f.gender in ("male", "female") and f.age is not None for f in faces)
    result = caption(faces, CaptionPolicy(class_word="person"))
    words = [class_word_for(f) for f in faces]
    assert result.class_word in WORDS and result.class_word == max(set(words), key=words.count)
    assert result.texts[0] == f"a photo of sks {result.class_word}"


def test_dlib_path_keeps_the_presets_class_word(attr_home, astronaut, hopper):
    from portrait.core.context import RunContext
    from portrait.core.faces import make_analyzer

    ctx = RunContext.create(attr_home, preset="tiny")
    faces = [make_analyzer(ctx, "dlib").detect(image, embed=False)[0] for image in (astronaut, hopper)]
    assert all(f.gender is None for f in faces)
    assert caption(faces, CaptionPolicy(class_word="person")).class_word == "person"
