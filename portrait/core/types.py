"""The values that flow between stages, in pipeline order.

Photo -> FaceObservation -> PhotoAssessment -> TrainingSet -> Identity
      -> GenerationRequest -> Candidate -> RankedResult

Images are always HxWx3 uint8 RGB numpy arrays. Stages take these values and return
new ones; none of them holds a model or a file handle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
from pydantic import BaseModel

from .options import NoOptions, Resolved, given_options

# Stable words for report.json (docs/ARCHITECTURE.md#report-json). Tests and users rely on them.
RejectReason = Literal[
    "unreadable",
    "too_large",
    "too_small",
    "no_face",
    "face_too_small",
    "other_person",
    "duplicate",
    "blurry",
    "bad_pose",
    "bad_exposure",
]
REJECT_REASONS: tuple[str, ...] = get_args(RejectReason)
Family = Literal["sd15", "sdxl"]


@dataclass(frozen=True)
class Photo:
    """One decoded input picture. `source` is what the user gave (a file, or `archive.zip::member`)."""

    source: str
    image: np.ndarray  # HxWx3 uint8 RGB, EXIF orientation applied
    sha256: str  # of the original bytes, for duplicate detection and manifests

    @property
    def size(self) -> tuple[int, int]:
        h, w = self.image.shape[:2]
        return w, h


@dataclass(frozen=True)
class IngestRejection:
    """An input that never became a Photo (unreadable, too large, too small, duplicate)."""

    source: str
    reason: RejectReason
    detail: str = ""


@dataclass(frozen=True)
class FaceObservation:
    """One detected face, the same shape whatever backend found it.

    `kps` are the 5 keypoints in insightface order: image-left eye, image-right eye, nose,
    image-left mouth corner, image-right mouth corner. `embedding` is the backend's raw
    recognition vector (not normalized); `backend` says which space it lives in, because
    embeddings of different backends or packs must never be compared.
    """

    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels
    score: float
    kps: np.ndarray  # (5, 2) float32
    embedding: np.ndarray | None  # (d,) float32, raw
    backend: str  # e.g. "dlib", "insightface:antelopev2"
    landmarks: np.ndarray | None = None  # (68, 2) or (106, 2) when the backend gives them
    gender: Literal["male", "female"] | None = None
    age: float | None = None

    @property
    def width(self) -> float:
        return self.box[2] - self.box[0]

    @property
    def height(self) -> float:
        return self.box[3] - self.box[1]

    @property
    def area(self) -> float:
        return max(self.width, 0.0) * max(self.height, 0.0)


@dataclass(frozen=True)
class PhotoScores:
    """Per-photo measurements, each in [0, 1] except the pose angles (degrees)."""

    identity: float = 0.0  # similarity of the chosen face to the consensus
    sharpness: float = 0.0
    exposure: float = 0.0
    face_size: float = 0.0
    yaw: float = 0.0
    pitch: float = 0.0
    roll: float = 0.0
    total: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {k: round(float(v), 4) for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class PhotoAssessment:
    """What analysis and ranking concluded about one input."""

    source: str
    status: Literal["kept", "rejected"]
    reason: RejectReason | None
    photo: Photo | None  # None when the file never decoded
    faces: tuple[FaceObservation, ...] = ()
    face: FaceObservation | None = None  # the face that is the person (or the best guess)
    scores: PhotoScores = field(default_factory=PhotoScores)
    detail: str = ""  # the human reason behind `reason` (e.g. HEIC needs: pip install 'portrait[heic]')

    def report_row(self) -> dict[str, Any]:
        row = {
            "path": self.source,
            "status": self.status,
            "reason": self.reason,
            "faces": len(self.faces),
            "scores": self.scores.as_dict(),
        }
        if self.detail:
            row["detail"] = self.detail
        return row


@dataclass(frozen=True)
class TrainingSet:
    """The prepared, aligned training images of one person, ready for a trainer."""

    root: Path  # the prepare output folder
    images: tuple[Path, ...]  # aligned square crops (train/*.png)
    captions: tuple[str, ...]  # one per image, with the trigger token and class word
    trigger: str
    class_word: str
    reference: Path  # best face for fusion (full photo, cropped to head and shoulders)
    consensus: dict[str, np.ndarray]  # face backend -> consensus embedding (unit-length for insightface; dlib's raw mean, as its distances are calibrated on raw descriptors)
    assessments: tuple[PhotoAssessment, ...]  # every input, kept and rejected
    kept_photos: tuple[Path, ...] = ()  # top-k originals (downscaled) for zero-shot embeddings


@dataclass(frozen=True)
class LoraFile:
    """A trained identity LoRA for one base family."""

    family: Family
    path: Path  # diffusers / peft format
    kohya_path: Path | None
    base_model: str
    rank: int
    alpha: float


@dataclass(frozen=True)
class Identity:
    """A person's bundle on disk (HOME/identities/NAME). See portrait/identity.py for the layout."""

    name: str
    root: Path
    trigger: str
    class_word: str
    reference: Path
    photos: tuple[Path, ...]  # top-k photos kept for zero-shot embeddings
    consensus: dict[str, np.ndarray]  # face backend -> consensus embedding (unit-length for insightface; dlib's raw mean, as its distances are calibrated on raw descriptors)
    loras: dict[str, LoraFile]  # family -> LoRA
    manifest: dict[str, Any]

    def lora_for(self, family: str) -> LoraFile | None:
        return self.loras.get(family)


@dataclass(frozen=True)
class GenerationRequest:
    """Everything one generate call needs, fully resolved (template + preset + overrides) and
    typed: `options` is the backend's own options model (BackendSpec.options, checked once at
    resolution, defaults filled in), `resolved` what the resolver decided besides them."""

    identity: Identity
    backend: str
    template: str | None
    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    guidance: float
    scheduler: str
    seed: int
    n: int
    lora_weight: float = 1.0
    controls: dict[str, float] = field(default_factory=dict)  # control name -> strength
    options: BaseModel = field(default_factory=NoOptions)  # the backend's typed options
    resolved: Resolved = field(default_factory=Resolved)  # composition, fast mode, style LoRA, template image, ...
    # More people in the same picture (a group template, regional FaceID), loaded by the flow:
    # a backend takes them from here and never opens a bundle by a name it was handed.
    # options.identities (GroupOptions) records their names for the metadata.
    people: tuple[Identity, ...] = ()

    def person(self, name: str) -> Identity:
        """The request's identity or one of its people, by name (an unknown name is an error of ours)."""
        for who in (self.identity, *self.people):
            if who.name == name:
                return who
        raise KeyError(f"identity '{name}' is not one of this request's people")

    def record(self) -> dict[str, Any]:
        """The values recorded in every output's metadata and results.json: `options` holds the
        resolver's values and the options that were given (not every default)."""
        return {
            "identity": self.identity.name,
            "backend": self.backend,
            "template": self.template,
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "width": self.width,
            "height": self.height,
            "steps": self.steps,
            "guidance": self.guidance,
            "scheduler": self.scheduler,
            "seed": self.seed,
            "n": self.n,
            "lora_weight": self.lora_weight,
            "controls": dict(self.controls),
            "options": {**self.resolved.model_dump(mode="json"), **given_options(self.options)},
        }


@dataclass(frozen=True)
class Candidate:
    """One generated image before ranking, with how it was made."""

    image: np.ndarray
    seed: int
    request: GenerationRequest
    timings: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)  # backend notes (e.g. "ran zero-shot")


@dataclass(frozen=True)
class FaceScore:
    """One assigned face of a group picture, scored against its own identity."""

    identity: str
    face: int  # the template face index (left to right)
    box: tuple[float, float, float, float] | None  # the detected face in the finished image (None: not found)
    similarity: float | None  # to this identity's consensus embedding; None: the face was not found (not measured)
    reference_similarity: float | None
    face_size: float  # face box area / image area
    passed: bool = False  # found, of a judgeable size, at or above the gate threshold, and not confused
    # identity confusion: this face's similarity to each OTHER identity in the picture, and how much
    # more it is like its own (own - the highest other); a blended face has a margin near 0
    confusion: dict[str, float] = field(default_factory=dict)
    margin: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"identity": self.identity, "face": self.face,
                "box": None if self.box is None else [round(float(v), 1) for v in self.box],
                "similarity": self.similarity, "reference_similarity": self.reference_similarity,
                "face_size": self.face_size, "passed": self.passed, "confusion": dict(self.confusion),
                "margin": self.margin}


@dataclass(frozen=True)
class CandidateScore:
    # to the identity's consensus embedding, in the ranking space (`space`); a group: the lowest
    # assigned face's. None when no face was found: not measured, so never ranked or averaged as a
    # number (a faceless output used to score 0.0 and sit among the measured ones).
    similarity: float | None
    reference_similarity: float | None
    faces: int
    face_size: float
    clip_t: float | None = None
    space: str | None = None  # the embedding space of `similarity` (the independent one by default)
    # every space scored: space -> {"role": "independent"|"conditioning", "similarity", "reference_similarity"}
    spaces: dict[str, dict[str, Any]] = field(default_factory=dict)
    copy_paste: str | None = None  # why the output looks like a copy of one of the identity's own photos
    per_face: tuple[FaceScore, ...] = ()  # a group picture: every assigned face, in assignment order


@dataclass(frozen=True)
class RankedResult:
    """A scored candidate in final order; `path` is set once it is written."""

    candidate: Candidate
    score: CandidateScore
    rank: int
    passed_gate: bool
    path: Path | None = None
