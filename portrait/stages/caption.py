"""Caption: the training caption of each image, with the trigger token and a class word.

The class word comes from the face backend's gender/age when it gives them (a majority
vote over the kept photos, since single estimates are noisy), else the preset's default.
The trigger directly precedes the class word ("a photo of sks woman"), as DreamBooth and
FaceChain do, so prompts at generation time can use "{trigger} {class}".
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import ClassVar, Sequence

from portrait.core.types import FaceObservation


@dataclass(frozen=True)
class CaptionPolicy:
    """The caption settings of the preset's `prepare` section (the declaration: type, default, bounds)."""

    SECTION: ClassVar[str] = "prepare"

    trigger: str = "sks"  # the identity's rare token in every caption and prompt
    class_word: str = "person"  # used when the face backend gives no gender/age
    template: str = field(default="a photo of {trigger} {class_word}", metadata={"key": "caption_template"})  # each training image's caption


@dataclass(frozen=True)
class Captions:
    trigger: str
    class_word: str
    texts: tuple[str, ...]


def class_word_for(face: FaceObservation) -> str | None:
    """FaceChain-style words: boy/girl under 18, man/woman, old man/old woman from 60."""
    if face.gender is None:
        return None
    age = face.age if face.age is not None else 30.0
    if age < 18:
        return "boy" if face.gender == "male" else "girl"
    if age >= 60:
        return "old man" if face.gender == "male" else "old woman"
    return "man" if face.gender == "male" else "woman"


def identity_class_word(faces: Sequence[FaceObservation], default: str) -> str:
    words = [w for w in (class_word_for(f) for f in faces) if w]
    return Counter(words).most_common(1)[0][0] if words else default


def caption(faces: Sequence[FaceObservation], policy: CaptionPolicy = CaptionPolicy()) -> Captions:
    """One caption per kept face (all the same person, so all share trigger and class word)."""
    word = identity_class_word(faces, policy.class_word)
    text = policy.template.format(trigger=policy.trigger, class_word=word)
    return Captions(policy.trigger, word, tuple(text for _ in faces))
