"""`portrait prepare`: ingest -> analyze -> rank -> prepare -> caption, and the outputs.

Writes into OUT: report.json (docs/ARCHITECTURE.md#report-json), train/NNN.png + NNN.txt (aligned crops and
captions), reference.png (the fusion face, head and shoulders), photos/NNN.jpg (the top-k
originals downscaled to <= 1024 px, for zero-shot embeddings) and contact_sheet.png (every
input with kept/rejected and the reason). Returns a PrepareResult holding the TrainingSet.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, ClassVar, Sequence

import numpy as np
from pydantic import Field

from portrait.core.config import Settings
from portrait.core.context import RunContext
from portrait.core.declare import policy_from, preset_label
from portrait.core.errors import BadInput
from portrait.core.faces import INSIGHTFACE_PACKS, FaceAnalyzer, make_analyzer
from portrait.core.errors import Interrupted, OutputFailed
from portrait.core.interrupt import signal_of
from portrait.core.io import as_published, check_replaceable, discard_dir, publish_dir, staging_for, write_image, write_json, write_text
from portrait.core.formats.sheet import FaceBox, Tile, write_contact_sheet
from portrait.core.types import PhotoAssessment, TrainingSet
from portrait.stages.analyze import analyze
from portrait.stages.background import BackgroundPolicy, Segmenter, load_segmenter, whiten
from portrait.stages.caption import CaptionPolicy, caption
from portrait.stages.ingest import IngestPolicy, ingest
from portrait.stages.prepare import PrepareHooks, PreparePolicy, prepare as prepare_crops
from portrait.stages.rank import Ranking, RankPolicy, mean_embedding, rank

KEPT_PHOTO_MAX_SIDE = 1024
REFERENCE_SIZE = 512
THUMB = 160


@dataclass(frozen=True)
class PrepareResult:
    out: Path
    training_set: TrainingSet
    report: dict[str, Any]
    face_backend: str

    @property
    def report_path(self) -> Path:
        return self.out / "report.json"

    @property
    def contact_sheet(self) -> Path:
        return self.out / "contact_sheet.png"


@dataclass(frozen=True)
class PrepareFlowPolicy:
    """The keys of the preset's `prepare` section this flow reads itself (the declaration)."""

    SECTION: ClassVar[str] = "prepare"

    face_backend: str = "auto"  # auto: insightface when its pack is present, else dlib
    face_options: dict[str, Any] = field(default_factory=dict)  # e.g. {landmarks68: false}: dlib without the non-commercial 68-point model
    min_photos: Annotated[int, Field(ge=1)] = 3  # fewer usable photos than this: exit 2, with the report


# Every declaration that reads the `prepare` section: the section is checked against their union.
PREPARE_READERS = (IngestPolicy, RankPolicy, PreparePolicy, CaptionPolicy, BackgroundPolicy, PrepareFlowPolicy)


def prepare(photos: Sequence[str | Path] | str | Path, out: str | Path, *, settings: Settings | None = None,
            preset: str | None = None, face_backend: str | None = None, top_k: int | None = None,
            ctx: RunContext | None = None, progress: Callable[[str, float, float], None] | None = None,
            hooks: PrepareHooks = PrepareHooks(), extra_backends: Sequence[str] | None = None,
            whiten_background: bool | None = None) -> PrepareResult:
    """Rank, filter and prepare one person's photos. Raises BadInput (exit 2) when fewer than
    the preset's `min_photos` are usable, after publishing the report and contact sheet.

    Everything is written into a staging folder beside OUT and swapped in at the end, so OUT
    is either the whole earlier result or the whole new one (never a mix, never half)."""
    inputs = [photos] if isinstance(photos, (str, Path)) else list(photos)
    ctx = ctx or RunContext.create(settings, preset=preset, progress=progress)
    progress = progress or ctx.progress
    section = ctx.preset.section("prepare")
    if top_k is not None:
        section["top_k"] = top_k
    if whiten_background is not None:
        section["whiten_background"] = whiten_background
    policies = check_section(section, f"{preset_label(ctx.preset)} prepare")
    out = Path(out).expanduser()
    check_out(out, inputs, marker="report.json", what="prepare")
    background = policies["background"]
    segmenter = load_segmenter(ctx, ctx.preset.model("background_segmenter")) if background.whiten else None
    try:
        return _prepare(ctx, inputs, out, policies, face_backend, progress, hooks, extra_backends, segmenter)
    except KeyboardInterrupt as exc:
        if isinstance(exc, Interrupted):
            raise
        raise Interrupted(f"prepare stopped; nothing written to {out}", signal_of(exc)) from None


def _prepare(ctx: RunContext, inputs: list, out: Path, policies: dict, face_backend: str | None,
             progress, hooks: PrepareHooks, extra_backends: Sequence[str] | None,
             segmenter: Segmenter | None = None) -> PrepareResult:
    # the analyzer first: a missing or license-refused face model stops before any work.
    # preset `prepare.face_options`, e.g. {landmarks68: false} for the CC0-only dlib models
    flow: PrepareFlowPolicy = policies["flow"]
    analyzer = make_analyzer(ctx, face_backend or flow.face_backend, **flow.face_options)
    ingested = ingest(inputs, policies["ingest"], progress)
    analyses = analyze(ingested.photos, analyzer, progress)
    ranking = rank(analyses, analyzer.scale, policies["rank"])
    assessments = _in_input_order(ingested.order, ranking, ingested.rejected)
    report = build_report(assessments, ranking, out)
    if segmenter is not None:  # recorded only when on: the default report keeps its documented shape (docs/ARCHITECTURE.md#report-json)
        report["background"] = {"whitened": True, "model": segmenter.model_id, "license": segmenter.license}
    minimum = flow.min_photos
    passed = sum(a.status == "kept" for a in assessments)

    staging = staging_for(out)
    try:
        write_json(staging / "report.json", report)
        write_prepare_sheet(staging / "contact_sheet.png", assessments)
        if passed < minimum:
            # The report says why; it is published (as a unit) so the user can read it.
            publish_dir(staging, out)
            raise BadInput(f"{', '.join(str(i) for i in inputs)}: only {passed} usable photo(s), need {minimum} "
                           f"({summarize_reasons(assessments)}; see {out / 'report.json'})")
        training_set = write_training_set(staging, ranking, policies, hooks, progress, segmenter)
        consensus = {ranking.space: ranking.consensus}
        for backend in _extra_backends(ctx, analyzer, extra_backends):
            extra = consensus_in_space(make_analyzer(ctx, backend), ranking.kept)
            if extra is not None:
                consensus[backend] = extra
        publish_dir(staging, out)
    except OutputFailed as exc:
        raise as_published(exc, staging, out) from None
    finally:
        discard_dir(staging)
    training_set = _moved(training_set, staging, out)
    training_set = TrainingSet(**{**training_set.__dict__, "consensus": consensus, "assessments": tuple(assessments)})
    return PrepareResult(out, training_set, report, analyzer.backend)


PREPARE_NAMES = ("ingest", "rank", "prepare", "caption", "background", "flow")


def check_section(section: dict, where: str) -> dict[str, Any]:
    """The whole prepare section against every declaration that reads it (a typo such as
    `treshold:` is refused with the known keys), and each policy built from its own keys."""
    return {name: policy_from(cls, section, where, shared=PREPARE_READERS)
            for name, cls in zip(PREPARE_NAMES, PREPARE_READERS)}


def check_out(out: Path, inputs: Sequence[str | Path], *, marker: str, what: str) -> None:
    """OUT must not be (or be inside) an input folder or file, and an existing OUT must be empty
    or an earlier result of the same command (it is replaced as a unit): never the user's
    other files."""
    resolved = check_replaceable(out)
    for item in inputs:
        given = Path(item).expanduser()
        if not given.exists():
            continue
        source = given.resolve()
        if resolved == source or source in resolved.parents or (given.is_file() and resolved == source.parent):
            raise BadInput(f"{out}: --out is inside the input {item}; choose a folder outside the photos")
    if out.exists() and not out.is_dir():
        raise BadInput(f"{out}: --out exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / marker).is_file():
        raise BadInput(f"{out}: --out holds files that are not an earlier {what} result; "
                       f"choose a new or empty folder")


def _moved(tset: TrainingSet, staging: Path, out: Path) -> TrainingSet:
    """The training set's paths, from the staging folder to where it was published."""

    def move(path: Path) -> Path:
        return out / Path(path).relative_to(staging)

    return TrainingSet(**{**tset.__dict__, "root": out, "images": tuple(move(p) for p in tset.images),
                          "reference": move(tset.reference), "kept_photos": tuple(move(p) for p in tset.kept_photos)})


def _in_input_order(order: Sequence[str], ranking: Ranking, ingest_rejections) -> list[PhotoAssessment]:
    by_source: dict[str, PhotoAssessment] = {a.source: a for a in ranking.assessments}
    for r in ingest_rejections:
        by_source[r.source] = PhotoAssessment(r.source, "rejected", r.reason, None, detail=r.detail)
    return [by_source[s] for s in order if s in by_source]


def summarize_reasons(assessments: Sequence[PhotoAssessment]) -> str:
    counts = Counter(a.reason for a in assessments if a.status == "rejected")
    return ", ".join(f"{n} {reason}" for reason, n in counts.most_common()) or "no photos rejected"


def build_report(assessments: Sequence[PhotoAssessment], ranking: Ranking, out: Path) -> dict[str, Any]:
    return {
        "photos": [a.report_row() for a in assessments],
        "reference": str(out / "reference.png") if ranking.reference else None,
        "kept": sum(a.status == "kept" for a in assessments),
        "rejected": sum(a.status == "rejected" for a in assessments),
    }


def write_training_set(out: Path, ranking: Ranking, policies: dict[str, Any], hooks: PrepareHooks,
                       progress: Callable[[str, float, float], None] | None,
                       segmenter: Segmenter | None = None) -> TrainingSet:
    policy: PreparePolicy = policies["prepare"]
    background: BackgroundPolicy = policies["background"]
    captions = caption([a.face for a in ranking.kept], policies["caption"])
    crops = prepare_crops([(a.photo, a.face) for a in ranking.kept], policy, hooks)
    images, kept_photos = [], []
    for i, (assessment, crop, text) in enumerate(zip(ranking.kept, crops, captions.texts)):
        stem = f"{i:03d}"
        pixels = crop.image if segmenter is None else whiten(crop.image, segmenter.mask(crop.image), background.color)
        images.append(write_image(out / "train" / f"{stem}.png", pixels, {"source": assessment.source}))
        write_text(out / "train" / f"{stem}.txt", text + "\n")
        kept_photos.append(write_image(out / "photos" / f"{stem}.jpg", downscale(assessment.photo.image)))
        if progress:
            progress("preparing images", i + 1, len(ranking.kept))
    reference = ranking.reference
    ref_policy = PreparePolicy(**{**policy.__dict__, "resolution": max(REFERENCE_SIZE, policy.resolution)})
    ref_crop = prepare_crops([(reference.photo, reference.face)], ref_policy)[0]
    reference_path = write_image(out / "reference.png", ref_crop.image, {"source": reference.source})
    return TrainingSet(
        root=out,
        images=tuple(images),
        captions=captions.texts,
        trigger=captions.trigger,
        class_word=captions.class_word,
        reference=reference_path,
        consensus={ranking.space: ranking.consensus},
        assessments=ranking.assessments,
        kept_photos=tuple(kept_photos),
    )


def downscale(image: np.ndarray, max_side: int = KEPT_PHOTO_MAX_SIDE) -> np.ndarray:
    from PIL import Image

    h, w = image.shape[:2]
    if max(h, w) <= max_side:
        return image
    scale = max_side / max(h, w)
    return np.asarray(Image.fromarray(image).resize((round(w * scale), round(h * scale)), Image.Resampling.LANCZOS))


def _extra_backends(ctx: RunContext, analyzer: FaceAnalyzer, wanted: Sequence[str] | None) -> list[str]:
    """The other embedding spaces to fill the consensus for: by default every insightface pack
    that resolves under this preset (zero-shot backends read them from the identity)."""
    if wanted is not None:
        return [b for b in wanted if b != analyzer.backend]
    found = []
    for pack in INSIGHTFACE_PACKS:
        backend = f"insightface:{pack}"
        if backend != analyzer.backend and ctx.registry.is_present(pack, ctx.settings, tiny=ctx.preset.tiny):
            found.append(backend)
    return found


def consensus_in_space(analyzer: FaceAnalyzer, kept: Sequence[PhotoAssessment]) -> np.ndarray | None:
    """The kept face's embedding in another backend's space: per photo the face that overlaps
    the chosen face most (largest face when none overlaps), averaged."""
    vectors = []
    for a in kept:
        faces = [f for f in analyzer.detect(a.photo.image) if f.embedding is not None]
        if not faces:
            continue
        best = max(faces, key=lambda f: (_iou(f.box, a.face.box), f.area))
        vectors.append(best.embedding)
    return mean_embedding(vectors, analyzer.backend) if vectors else None


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    x1, y1, x2, y2 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


# --- contact sheet ---------------------------------------------------------------------------

# prepare's sheet: 160 px cells edge to edge, six across, a green (kept) or red band with the reason
PREPARE_SHEET = {"thumb": THUMB, "columns": 6, "caption_h": 30, "gap": 0, "background": (40, 40, 40), "enlarge": True}


def assessment_tiles(assessments: Sequence[PhotoAssessment]) -> list[Tile]:
    """Every input as a tile: its faces boxed (the chosen one green when kept, yellow when not)."""
    tiles = []
    for a in assessments:
        kept = a.status == "kept"
        boxes = tuple(FaceBox(tuple(face.box), (0, 255, 0) if face is a.face and kept
                              else (255, 200, 0) if face is a.face else (200, 200, 200))
                      for face in a.faces) if a.photo is not None else ()
        name = Path(a.source.split("::")[-1]).name
        status = f"kept {a.scores.total:.2f}" if kept else (a.reason or "rejected")
        white = (255, 255, 255)
        tiles.append(Tile(a.photo.image if a.photo is not None else None, ((name[:24], white), (status, white)),
                          band=(30, 140, 60) if kept else (170, 40, 40), boxes=boxes))
    return tiles


def write_prepare_sheet(target: Path, assessments: Sequence[PhotoAssessment]) -> Path:
    return write_contact_sheet(target, assessment_tiles(assessments), **PREPARE_SHEET)


__all__ = ["PrepareResult", "prepare"]
