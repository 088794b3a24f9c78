"""Rank: which photos show the person, how good each one is, and which face is the reference.

1. Consensus: the identity present in the most photos, over *all* faces (not only the
   largest): the medoid face, the one that the most other photos match (each photo counts
   once, through its best-matching face), then an iterative trimmed mean of the matching
   faces around it. A group photo or a stranger can never become the consensus unless they
   are in the majority of photos.
2. Per photo: the face most similar to the consensus is "the face"; the photo is rejected,
   in this order, as `no_face`, `face_too_small`, `bad_exposure` (both make the embedding
   unreliable), `other_person` (best face below the backend's threshold), `bad_pose`,
   `blurry`.
3. Total score (documented in the report): identity x frontalness x quality, where
   identity is the similarity clipped to [0, 1], frontalness = cos(yaw) x cos(pitch), and
   quality = (0.5 + 0.5 sharpness)(0.5 + 0.5 exposure)(0.5 + 0.5 face_size). This extends
   EasyPhoto's angle x similarity with image quality.
4. Kept photos are ordered by total; the reference (for face fusion) is the best total.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, ClassVar, Sequence

import numpy as np
from pydantic import Field

from portrait.core.faces import SimilarityScale
from portrait.core.types import FaceObservation, PhotoAssessment, PhotoScores

from .analyze import FaceQuality, PhotoAnalysis


@dataclass(frozen=True)
class RankPolicy:
    """The ranking settings of the preset's `prepare` section (the declaration: type, default, bounds)."""

    SECTION: ClassVar[str] = "prepare"

    top_k: Annotated[int, Field(ge=1)] = 15  # photos kept for training, best first
    min_face_px: Annotated[int, Field(ge=1)] = 64  # the face box's shorter side in the original photo; smaller is `face_too_small`
    max_yaw: Annotated[float, Field(ge=0.0, le=180.0)] = 45.0  # degrees; beyond is `bad_pose`
    max_pitch: Annotated[float, Field(ge=0.0, le=180.0)] = 35.0  # degrees; beyond is `bad_pose`
    min_sharpness: Annotated[float, Field(ge=0.0, le=1.0)] = 0.15  # below is `blurry` (Laplacian variance on the face, mapped to [0, 1])
    min_exposure: Annotated[float, Field(ge=0.0, le=1.0)] = 0.2  # below is `bad_exposure`
    trim_rounds: Annotated[int, Field(ge=0)] = 3  # outlier-trimming rounds of the identity consensus


@dataclass(frozen=True)
class Ranking:
    consensus: np.ndarray | None  # the identity's embedding (unit norm for cosine spaces, mean descriptor for dlib)
    space: str  # the embedding space ("dlib", "insightface:antelopev2", ...)
    assessments: tuple[PhotoAssessment, ...]  # every analysed photo, in input order
    kept: tuple[PhotoAssessment, ...]  # best first
    rejected: tuple[PhotoAssessment, ...]
    reference: PhotoAssessment | None

    @property
    def top(self) -> tuple[PhotoAssessment, ...]:
        return self.kept


def _embeddings(analyses: Sequence[PhotoAnalysis]) -> list[list[np.ndarray]]:
    return [[f.embedding for f in a.faces if f.embedding is not None] for a in analyses]


def _best_match(center: np.ndarray, faces: Sequence[np.ndarray], scale: SimilarityScale) -> tuple[int, float]:
    sims = [scale(center, e) for e in faces]
    i = int(np.argmax(sims))
    return i, float(sims[i])


def mean_embedding(vectors: Sequence[np.ndarray], space: str) -> np.ndarray:
    """The centre of one person's embeddings: the raw mean for dlib (its threshold is a
    euclidean distance on raw descriptors, norm ~1.5), the unit-norm mean of unit vectors
    for cosine spaces."""
    stack = np.stack([np.asarray(v, np.float64) for v in vectors])
    if space == "dlib":  # euclidean space: average the raw descriptors
        return stack.mean(0).astype(np.float32)
    stack = stack / np.linalg.norm(stack, axis=1, keepdims=True).clip(1e-12)
    mean = stack.mean(0)
    return (mean / max(np.linalg.norm(mean), 1e-12)).astype(np.float32)


def find_consensus(analyses: Sequence[PhotoAnalysis], scale: SimilarityScale, rounds: int = 3) -> np.ndarray | None:
    """The majority identity's embedding: medoid over all faces, refined by a trimmed mean."""
    per_photo = _embeddings(analyses)
    candidates = [(p, e) for p, faces in enumerate(per_photo) for e in faces]
    if not candidates:
        return None
    best, best_key = None, None
    for p, emb in candidates:
        support, total = 0, 0.0
        for q, faces in enumerate(per_photo):
            if q == p or not faces:
                continue
            _, sim = _best_match(emb, faces, scale)
            support += sim >= scale.threshold
            total += sim
        key = (support, total)
        if best_key is None or key > best_key:
            best, best_key = emb, key
    center = np.asarray(best, np.float32)
    for _ in range(rounds):
        members = []
        for faces in per_photo:
            if faces:
                i, sim = _best_match(center, faces, scale)
                if sim >= scale.threshold:
                    members.append(faces[i])
        if not members:
            break
        center = mean_embedding(members, scale.space)
    return center


def frontalness(quality: FaceQuality) -> float:
    return max(0.0, math.cos(math.radians(quality.yaw))) * max(0.0, math.cos(math.radians(quality.pitch)))


def total_score(identity: float, quality: FaceQuality) -> float:
    look = (0.5 + 0.5 * quality.sharpness) * (0.5 + 0.5 * quality.exposure) * (0.5 + 0.5 * quality.face_size)
    return float(min(1.0, max(0.0, identity)) * frontalness(quality) * look)


def rejection_reason(identity: float, quality: FaceQuality, scale: SimilarityScale, policy: RankPolicy) -> str | None:
    # A tiny or badly exposed face gives an unreliable embedding, so those causes are named
    # before identity: "too dark" is what the user can fix, "someone else" would mislead.
    if quality.face_px < policy.min_face_px:
        return "face_too_small"
    if quality.exposure < policy.min_exposure:
        return "bad_exposure"
    if identity < scale.threshold:
        return "other_person"
    if abs(quality.yaw) > policy.max_yaw or abs(quality.pitch) > policy.max_pitch:
        return "bad_pose"
    if quality.sharpness < policy.min_sharpness:
        return "blurry"
    return None


def assess(analysis: PhotoAnalysis, consensus: np.ndarray | None, scale: SimilarityScale,
           policy: RankPolicy) -> PhotoAssessment:
    photo = analysis.photo
    with_embedding = [i for i, f in enumerate(analysis.faces) if f.embedding is not None]
    if not with_embedding or consensus is None:
        return PhotoAssessment(photo.source, "rejected", "no_face", photo, analysis.faces)
    sims = {i: scale(consensus, analysis.faces[i].embedding) for i in with_embedding}
    chosen = max(sims, key=sims.get)
    face: FaceObservation = analysis.faces[chosen]
    quality = analysis.qualities[chosen]
    identity = sims[chosen]
    scores = PhotoScores(identity=identity, sharpness=quality.sharpness, exposure=quality.exposure,
                         face_size=quality.face_size, yaw=quality.yaw, pitch=quality.pitch, roll=quality.roll,
                         total=total_score(identity, quality))
    reason = rejection_reason(identity, quality, scale, policy)
    return PhotoAssessment(photo.source, "rejected" if reason else "kept", reason, photo, analysis.faces, face, scores)


def rank(analyses: Sequence[PhotoAnalysis], scale: SimilarityScale, policy: RankPolicy = RankPolicy()) -> Ranking:
    consensus = find_consensus(analyses, scale, policy.trim_rounds)
    assessments = tuple(assess(a, consensus, scale, policy) for a in analyses)
    passed = sorted((a for a in assessments if a.status == "kept"), key=lambda a: -a.scores.total)
    # Photos past top_k passed every check: the report keeps them as "kept"; only the
    # top_k (this tuple) go on to training.
    kept = tuple(passed[: policy.top_k]) if policy.top_k > 0 else tuple(passed)
    rejected = tuple(a for a in assessments if a.status == "rejected")
    return Ranking(consensus, scale.space, assessments, kept, rejected, kept[0] if kept else None)
