"""Caption: the training caption of each image, with the trigger token and a class word.

The class word comes from the face backend's gender/age when it gives them (a majority
vote over the kept photos, since single estimates are noisy), else the preset's default.
The trigger directly precedes the class word ("a photo of sks woman"), as DreamBooth and
FaceChain do, so prompts at generation time can use "{trigger} {class}".
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Sequence

from portrait.core.types import FaceObservation


@dataclass(frozen=True)
class CaptionPolicy:
    trigger: str = "sks"
    class_word: str = "person"  # used when the backend gives no gender
    template: str = "a photo of {trigger} {class_word}"

    SECTION_KEYS = ("trigger", "class_word", "caption_template")  # `template` is `caption_template` in a preset

    @classmethod
    def from_section(cls, section: dict, where: str = "preset prepare", shared=()) -> "CaptionPolicy":
        from portrait.core.declare import refuse_unknown, validate

        refuse_unknown(section, where, cls.SECTION_KEYS, *shared)
        names = {"trigger": "trigger", "class_word": "class_word", "caption_template": "template"}
        return validate(cls, {field: section[key] for key, field in names.items() if key in section}, where)


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
