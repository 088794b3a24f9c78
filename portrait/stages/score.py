"""Scoring and ranking candidates: identity similarity, face sanity, prompt adherence.

Each candidate's largest face is compared with the identity's consensus embedding (the
gate's measure) and with the reference photo's embedding, in the face backend's own space
and scale (portrait.core.faces). Face count and size are checked, because a candidate with
two faces, or a face too small to judge, is not a usable portrait whatever its similarity.

A group picture (a photo template with several faces, `Candidate.info["faces"]`) is scored
face by face: each assigned face is found again in the finished image by its box, compared
with its own identity, and the candidate passes the gate only when every assigned face
does. Its `similarity` is then the lowest of them, so ranking favours the group whose
weakest likeness is best. Faces of the template no identity was assigned to are the
template's own people: they are neither scored nor counted against the picture.

Prompt adherence (CLIP-T: cosine of CLIP's image and text embeddings) is reported beside
identity similarity: a face pasted over everything scores high on identity and low on
CLIP-T, the copy-paste failure that similarity alone rewards. Ranking uses identity by
default; `clip_weight` lets a preset trade some of it for adherence.

Two guards keep the score from flattering the method (issue 18):

- Independent scoring. A backend conditioned on one recognizer (InstantID on antelopev2,
  FaceID on buffalo_l) is scored in that space *and* in an independent one; ranking and the
  gate use the independent space unless the preset says `rank_space: conditioning`.
- Copy-paste. Real photo pairs of one person are far from identical (a median ArcFace
  cosine of about 0.46 is reported for real pairs), so an output closer to one of the
  identity's own photos than those photos are to each other (the bundle's stored spread,
  per space) is suspicious, not better; so is one whose keypoints and aligned crop reproduce
  a photo's. Such outputs are flagged `copy_paste` and ranked after the clean ones.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal, Mapping, Sequence

import numpy as np
from pydantic import Field

from portrait.core.faces import similarity
from portrait.core.archs.clip import ClipModel
from portrait.core.types import Candidate, CandidateScore, FaceObservation, FaceScore, RankedResult

_LORA_TAG = re.compile(r"<lora:[^>]*>")


@dataclass(frozen=True)
class ScorePolicy:
    """Settings from the preset's `score` section."""

    SECTION: ClassVar[str] = "score"

    threshold: float | None = None  # gate threshold; null = the face backend's same-person threshold (dlib 0.5, insightface 0.3)
    thresholds: dict[str, float] = field(default_factory=dict)  # per generation backend, e.g. {instantid: 0.4}
    expected_faces: Annotated[int, Field(ge=0)] = 1  # faces a candidate should show
    min_face_fraction: Annotated[float, Field(ge=0.0, le=1.0)] = 0.01  # face box area / image area
    max_face_fraction: Annotated[float, Field(ge=0.0, le=1.0)] = 0.9
    reference_weight: Annotated[float, Field(ge=0.0, le=1.0)] = 0.25  # ranking: share of reference similarity next to consensus similarity
    clip_weight: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0  # ranking: share of CLIP-T next to identity
    budget: Annotated[int, Field(ge=0)] = 4  # the gate generates at most this many extra candidates
    rounds: Annotated[int, Field(ge=0)] = 2  # ... in at most this many rounds
    rank_space: Literal["independent", "conditioning"] = "independent"  # the embedding space that ranks and gates
    copy_margin: float = 0.02  # copy-paste: similarity to one photo above the identity's own max + this
    copy_min_photos: Annotated[int, Field(ge=0)] = 3  # fewer photos than this give no spread: the similarity test is off
    copy_kps_tolerance: Annotated[float, Field(ge=0.0)] = 0.015  # copy-paste: mean keypoint distance (fraction of image side) ...
    copy_crop_correlation: Annotated[float, Field(ge=-1.0, le=1.0)] = 0.9  # ... and aligned-crop correlation at or above this
    group_margin: Annotated[float, Field(ge=0.0, le=1.0)] = 0.05  # a group face passes only when it is this much more like its own identity than like any other in the picture (a blended face fails)

    def threshold_for(self, backend: str, default: float) -> float:
        """The gate threshold for a generation backend (a per-backend value wins)."""
        if backend in self.thresholds:
            return float(self.thresholds[backend])
        return float(self.threshold) if self.threshold is not None else float(default)


def score_faces(faces: Sequence[FaceObservation], image_shape: tuple[int, ...], consensus: np.ndarray,
                reference: np.ndarray | None, space: str, clip_t: float | None = None) -> CandidateScore:
    """The score of one candidate from its detected faces (largest face is the subject). No face
    (or one the backend could not embed): similarity None, "no face", not a measured 0."""
    if not faces:
        return CandidateScore(similarity=None, reference_similarity=None, faces=0, face_size=0.0, clip_t=clip_t)
    face = max(faces, key=lambda f: f.area)
    h, w = image_shape[:2]
    size = round(face.area / float(h * w), 4)
    if face.embedding is None:
        return CandidateScore(similarity=None, reference_similarity=None, faces=len(faces), face_size=size,
                              clip_t=clip_t)
    sim = similarity(face.embedding, consensus, space)
    ref_sim = similarity(face.embedding, reference, space) if reference is not None else sim
    return CandidateScore(similarity=round(float(sim), 4), reference_similarity=round(float(ref_sim), 4),
                          faces=len(faces), face_size=size, clip_t=clip_t)


@dataclass(frozen=True)
class AssignedFace:
    """A face of a group picture the way the backend painted it: whose it is and where."""

    identity: str
    face: int  # template face index
    box: tuple[float, float, float, float]  # where it was painted, in the scored image's pixels


@dataclass(frozen=True)
class IdentityEmbeddings:
    consensus: np.ndarray
    reference: np.ndarray | None


def match_faces(found: Sequence[FaceObservation], assigned: Sequence[AssignedFace]) -> list[FaceObservation | None]:
    """For each assigned face, the detected face that overlaps its box most, each used once.

    A match needs IoU > 0.2 or the detected face's centre inside the assigned box (a
    regional text-to-image identity is assigned a whole region, much larger than a face).
    Detectors differ in box shape (dlib's boxes are tighter than insightface's), so the
    match is by overlap, greedy from the best pair, and not by equality of boxes.
    """
    pairs = sorted(((_match_key(f.box, a.box), i, j) for i, f in enumerate(found) for j, a in enumerate(assigned)),
                   reverse=True)
    out: list[FaceObservation | None] = [None] * len(assigned)
    used: set[int] = set()
    for (inside, iou), i, j in pairs:
        if not inside and iou <= 0.2:
            break
        if i in used or out[j] is not None:
            continue
        out[j] = found[i]
        used.add(i)
    return out


def _match_key(face: Sequence[float], box: Sequence[float]) -> tuple[bool, float]:
    cx, cy = (face[0] + face[2]) / 2, (face[1] + face[3]) / 2
    return (box[0] <= cx <= box[2] and box[1] <= cy <= box[3]), _iou(face, box)


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    x0, y0, x1, y1 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def score_group(found: Sequence[FaceObservation], image_shape: tuple[int, ...], assigned: Sequence[AssignedFace],
                people: Mapping[str, IdentityEmbeddings], space: str, policy: ScorePolicy, threshold: float,
                clip_t: float | None = None) -> CandidateScore:
    """Each assigned face against its own identity; the candidate's similarity is the lowest."""
    h, w = image_shape[:2]
    per_face = []
    others_of = {a.identity: [b.identity for b in assigned if b.identity != a.identity] for a in assigned}
    for want, face in zip(assigned, match_faces(found, assigned)):
        if face is None or face.embedding is None:
            per_face.append(FaceScore(want.identity, want.face, None if face is None else face.box, None, None,
                                      0.0 if face is None else round(face.area / float(h * w), 4), False))
            continue
        who = people[want.identity]
        sim = float(similarity(face.embedding, who.consensus, space))
        ref = float(similarity(face.embedding, who.reference, space)) if who.reference is not None else sim
        size = round(face.area / float(h * w), 4)
        # identity confusion: the same face against every other identity painted in the picture
        confusion = {name: round(float(similarity(face.embedding, people[name].consensus, space)), 4)
                     for name in others_of[want.identity] if name in people}
        margin = round(sim - max(confusion.values()), 4) if confusion else None
        ok = policy.min_face_fraction <= size <= policy.max_face_fraction and sim >= threshold and \
            (margin is None or margin >= policy.group_margin)
        per_face.append(FaceScore(want.identity, want.face, tuple(float(v) for v in face.box), round(sim, 4),
                                  round(ref, 4), size, bool(ok), confusion, margin))
    measured = [f for f in per_face if f.similarity is not None]  # a face not found is not a 0
    return CandidateScore(similarity=min(f.similarity for f in measured) if measured else None,
                          reference_similarity=min(f.reference_similarity for f in measured) if measured else None,
                          faces=len(found), face_size=min(f.face_size for f in per_face) if per_face else 0.0,
                          clip_t=clip_t, per_face=tuple(per_face))


def is_sane(score: CandidateScore, policy: ScorePolicy) -> bool:
    """One subject face (or the expected count) of a judgeable size; a group: every assigned face found
    at a judgeable size."""
    if score.per_face:
        return all(f.box is not None and policy.min_face_fraction <= f.face_size <= policy.max_face_fraction
                   for f in score.per_face)
    return (score.faces == policy.expected_faces
            and policy.min_face_fraction <= score.face_size <= policy.max_face_fraction)


def passes(score: CandidateScore, policy: ScorePolicy, threshold: float) -> bool:
    if score.per_face:  # a group passes only when every assigned face does, each unconfused with the others
        return is_sane(score, policy) and all(
            f.similarity is not None and f.similarity >= threshold and (f.margin is None or f.margin >= policy.group_margin)
            for f in score.per_face)
    return is_sane(score, policy) and score.similarity is not None and score.similarity >= threshold


def rank_key(score: CandidateScore, policy: ScorePolicy) -> float:
    """Higher is better; an output with no face measured has no key (`rank` puts it last)."""
    if score.similarity is None:
        return float("-inf")
    reference = score.similarity if score.reference_similarity is None else score.reference_similarity
    identity = (1 - policy.reference_weight) * score.similarity + policy.reference_weight * reference
    if policy.clip_weight and score.clip_t is not None:
        return (1 - policy.clip_weight) * identity + policy.clip_weight * score.clip_t
    return identity


def rank(candidates: Sequence[Candidate], scores: Sequence[CandidateScore], policy: ScorePolicy,
         threshold: float) -> list[RankedResult]:
    """Best first: candidates that pass the gate, then sane ones, then the rest, each by rank_key;
    within each group a copy-paste output comes after every clean one, and one with no face
    measured (similarity None) after every measured one."""
    if len(candidates) != len(scores):
        raise ValueError("one score per candidate")
    order = sorted(range(len(candidates)), key=lambda i: (
        not passes(scores[i], policy, threshold), scores[i].copy_paste is not None, not is_sane(scores[i], policy),
        scores[i].similarity is None, -rank_key(scores[i], policy)))
    return [RankedResult(candidate=candidates[i], score=scores[i], rank=position + 1,
                         passed_gate=passes(scores[i], policy, threshold))
            for position, i in enumerate(order)]


# --- which spaces score -----------------------------------------------------------------------

# Independent spaces, preferred first; dlib is the offline fallback (its models ship in a package).
INDEPENDENT = ("auraface", "insightface:buffalo_l", "insightface:antelopev2", "dlib")


# --- copy-paste ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spread:
    """Pairwise same-person similarity of the identity's own photos in one space."""

    space: str
    n: int  # photos
    min: float
    median: float
    max: float

    def as_dict(self) -> dict[str, Any]:
        return {"n": self.n, "min": self.min, "median": self.median, "max": self.max}

    @classmethod
    def from_dict(cls, space: str, row: Mapping[str, Any]) -> "Spread":
        return cls(space, int(row["n"]), float(row["min"]), float(row["median"]), float(row["max"]))


def self_spread(embeddings: Sequence[np.ndarray], space: str) -> Spread | None:
    """The spread of pairwise similarities of one person's photos (None below two photos)."""
    sims = [similarity(a, b, space) for i, a in enumerate(embeddings) for b in embeddings[i + 1:]]
    if not sims:
        return None
    return Spread(space, len(embeddings), round(float(np.min(sims)), 4), round(float(np.median(sims)), 4),
                  round(float(np.max(sims)), 4))


@dataclass(frozen=True)
class FaceSignature:
    """Where a face sits in its picture and what its aligned crop looks like."""

    kps: np.ndarray  # (5, 2) keypoints as fractions of the image width and height
    crop: np.ndarray  # (48, 48) aligned grey crop, zero mean, unit norm


def face_signature(image: np.ndarray, face: FaceObservation, size: int = 48) -> FaceSignature:
    from portrait.core.faces import norm_crop

    h, w = image.shape[:2]
    kps = np.asarray(face.kps, np.float64) / np.array([w, h], np.float64)
    crop = norm_crop(image, face.kps, size=size).astype(np.float64).mean(axis=2)
    crop -= crop.mean()
    norm = float(np.linalg.norm(crop))
    return FaceSignature(kps, crop / norm if norm > 0 else crop)


@dataclass(frozen=True)
class OwnPhoto:
    """One of the identity's photos, as the copy-paste guard compares outputs with it."""

    name: str
    signature: FaceSignature | None
    embeddings: dict[str, np.ndarray]  # space -> raw embedding


def copy_paste_reason(embeddings: Mapping[str, np.ndarray], signature: FaceSignature | None,
                      photos: Sequence[OwnPhoto], spreads: Mapping[str, Spread], policy: ScorePolicy) -> str | None:
    """Why an output looks copied from one of `photos`, or None when it looks rendered anew.

    The geometric test comes first (it names the photo reproduced); the similarity test
    catches a copy that was cropped or resized differently."""
    if signature is not None:
        for photo in photos:
            if photo.signature is None:
                continue
            distance = float(np.linalg.norm(signature.kps - photo.signature.kps, axis=1).mean())
            correlation = float((signature.crop * photo.signature.crop).sum())
            if distance <= policy.copy_kps_tolerance and correlation >= policy.copy_crop_correlation:
                return (f"reproduces {photo.name}: keypoints within {distance:.3f} of the image side, "
                        f"aligned-crop correlation {correlation:.3f}")
    for space, embedding in embeddings.items():
        spread = spreads.get(space)
        if embedding is None or spread is None or spread.n < policy.copy_min_photos:
            continue
        for photo in photos:
            other = photo.embeddings.get(space)
            if other is None:
                continue
            sim = similarity(embedding, other, space)
            if sim > spread.max + policy.copy_margin:
                return (f"similarity {sim:.3f} to {photo.name} ({space}) is above the identity's own "
                        f"photo-to-photo maximum {spread.max:.3f}")
    return None


# --- CLIP-T ---------------------------------------------------------------------------------


def load_clip(ctx, model_id: str) -> ClipModel:
    """The registry CLIP (tiny stand-in offline), through the model door (kind "clip-score"); fp16 on CUDA."""
    from portrait.core.models import load

    return load(ctx, model_id, "clip-score")


def clean_prompt(prompt: str) -> str:
    """The prompt as CLIP should read it: without A1111 `<lora:...>` tags and extra spaces."""
    return " ".join(_LORA_TAG.sub(" ", prompt).split())


def clip_t(clip: ClipModel, images: Sequence[np.ndarray], prompts: Sequence[str]) -> list[float]:
    """Cosine of CLIP image and text embeddings, one per (image, prompt) pair."""
    import torch

    if len(images) != len(prompts):
        raise ValueError("one prompt per image")
    if not images:
        return []
    inputs = clip.processor(text=[clean_prompt(p) for p in prompts], images=list(images), return_tensors="pt",
                            padding=True, truncation=True)
    dtype = next(clip.model.parameters()).dtype
    inputs = {k: (v.to(clip.device, dtype) if v.is_floating_point() else v.to(clip.device)) for k, v in inputs.items()}
    with torch.inference_mode():
        image_emb = _as_tensor(clip.model.get_image_features(pixel_values=inputs["pixel_values"]))
        text_emb = _as_tensor(clip.model.get_text_features(input_ids=inputs["input_ids"],
                                                           attention_mask=inputs.get("attention_mask")))
    image_emb = torch.nn.functional.normalize(image_emb.float(), dim=-1)
    text_emb = torch.nn.functional.normalize(text_emb.float(), dim=-1)
    return [round(float(v), 4) for v in (image_emb * text_emb).sum(-1).cpu()]


def _as_tensor(output):
    # transformers 5 may return a model output object instead of the pooled tensor
    if hasattr(output, "pooler_output") and output.pooler_output is not None:
        return output.pooler_output
    return output
