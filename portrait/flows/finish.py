"""Finishing: fusion -> retouch -> upscale (+ face restoration) -> score, then the gate.

`finish` takes generated candidates and returns them ranked, each stage switchable (per
template and on the CLI) and timed into the candidate's `timings`. Scoring happens in every
available embedding space that matters (`Scoring`): the one the backend was conditioned
with and an independent one, which ranks and gates by default; each output is also checked
against the identity's own photos for copy-paste (stages/score.py). `gate` wraps it for the
generate flow: while fewer than the wanted number of candidates pass the identity
threshold, it asks for more with new seeds, up to the preset's budget, then returns the
best it has, marking those below the threshold `passed_gate: false`.

    ranked = finish(ctx, identity, candidates, FinishSwitches())
    outcome = gate(ctx, identity, candidates, switches, generate_more=lambda seeds: [...])

A group picture (a photo template painted with several identities, or regional FaceID; the
backend lists them in `Candidate.info["faces"]` with their boxes) is finished face by face:
each assigned face is fused with its own identity's reference, retouched and restored, and
scored against its own identity (stages/score.py `score_group`); faces no identity was
assigned to are the template's people and are left exactly as they are.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Literal, Mapping, Sequence, get_args

import numpy as np

from portrait.core.declare import from_preset
from portrait.core.errors import BadInput, ModelMissing, bad_file
from portrait.core.faces import FaceAnalyzer, make_analyzer, pick_backend
from portrait.core.formats.images import read_rgb
from portrait.core.formats.sheet import FaceBox, Tile, write_contact_sheet
from portrait.core.parsing import load_face_parser
from portrait.core.types import Candidate, CandidateScore, FaceObservation, Identity, RankedResult
from portrait.stages import analyze as analyze_stage
from portrait.stages import fuse as fuse_stage
from portrait.stages import retouch as retouch_stage
from portrait.stages import score as score_stage
from portrait.stages import upscale as upscale_stage

Stage = Literal["fuse", "retouch", "upscale", "restore", "score", "clip"]
STAGES: tuple[str, ...] = get_args(Stage)
SWAPPER = "inswapper-128"
SWAP_SPACE = "insightface:buffalo_l"


@dataclass(frozen=True)
class FinishSwitches:
    """Which finishing stages run. Defaults: all but face restoration (it needs real weights)."""

    fuse: bool = True
    retouch: bool = True
    upscale: bool = True
    restore: bool = False
    score: bool = True
    clip: bool = True

    @classmethod
    def from_options(cls, *layers: Mapping[str, Any] | None) -> "FinishSwitches":
        """Later layers win: preset `finish.switches`, then the template's, then CLI flags (None = unset)."""
        values: dict[str, bool] = {}
        for layer in layers:
            for key, value in (layer or {}).items():
                if value is None:
                    continue
                if key not in STAGES:
                    raise BadInput(f"finish switch '{key}' is not one of {', '.join(STAGES)}")
                values[key] = bool(value)
        return cls(**values)

    def as_dict(self) -> dict[str, bool]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class FinishPolicy:
    """The preset's `finish` section (with its fuse/retouch/upscale sections) and the `score`
    section, as the stages' policies (the declaration: type, default, bounds)."""

    SECTION: ClassVar[str] = "finish"

    face_backend: str = "auto"  # auto: insightface when a real pack is present, else dlib
    face_parsing: bool = True  # BiSeNet skin/face masks (hair, glasses excluded) when present; landmarks otherwise
    fuse: fuse_stage.FusePolicy = field(default_factory=fuse_stage.FusePolicy)
    retouch: retouch_stage.RetouchPolicy = field(default_factory=retouch_stage.RetouchPolicy)
    upscale: upscale_stage.UpscalePolicy = field(default_factory=upscale_stage.UpscalePolicy)
    score: score_stage.ScorePolicy = field(default_factory=score_stage.ScorePolicy, metadata={"section": "score"})
    switches: dict[Stage, bool] = field(default_factory=dict)  # which stages run (FinishSwitches' defaults when absent); templates and CLI flags override

    @classmethod
    def from_preset(cls, preset) -> "FinishPolicy":
        return from_preset(cls, preset)


@dataclass(frozen=True)
class IdentityFaces:
    """The identity as the face backend sees it: its embeddings and the reference face."""

    space: str
    consensus: np.ndarray
    reference_embedding: np.ndarray | None
    reference_image: np.ndarray
    reference_face: FaceObservation


def identity_faces(analyzer: FaceAnalyzer, identity: Identity) -> IdentityFaces:
    """Embeddings of `identity` in the analyzer's space (from the bundle, else from its photos)."""
    image = read_rgb(identity.reference)
    reference_face = fuse_stage.require_face(analyzer.detect(image), str(identity.reference))
    consensus = identity.consensus.get(analyzer.backend)
    if consensus is None:
        consensus = _embed_photos(analyzer, [identity.reference, *identity.photos], reference_face)
    return IdentityFaces(analyzer.backend, np.asarray(consensus, np.float32), reference_face.embedding, image,
                         reference_face)


def _embed_photos(analyzer: FaceAnalyzer, paths: Sequence[Path], reference_face: FaceObservation) -> np.ndarray:
    """Mean embedding over the bundle's photos, for a backend the bundle has no consensus for."""
    embeddings = [reference_face.embedding] if reference_face.embedding is not None else []
    for path in paths[1:]:
        faces = analyzer.detect(read_rgb(path))
        if faces and faces[0].embedding is not None:
            embeddings.append(faces[0].embedding)
    if not embeddings:
        raise bad_file(paths[0], f"no face embedding could be computed with {analyzer.backend}")
    if analyzer.backend == "dlib":  # euclidean space: the mean descriptor
        return np.mean(embeddings, axis=0)
    mean = np.mean([e / max(np.linalg.norm(e), 1e-8) for e in embeddings], axis=0)
    return mean / max(np.linalg.norm(mean), 1e-8)


# --- the scoring spaces --------------------------------------------------------------------------


@dataclass(frozen=True)
class Scoring:
    """Who scores: the ranking space first, then the others, and the identity's own photos.

    `spaces` holds (role, analyzer, identity faces) with role "independent" or
    "conditioning" (the space the backend was conditioned with); `own` and `spreads` feed the
    copy-paste guard.
    """

    spaces: tuple[tuple[str, FaceAnalyzer, IdentityFaces], ...]
    own: tuple[score_stage.OwnPhoto, ...] = ()
    spreads: Mapping[str, score_stage.Spread] = field(default_factory=dict)
    conditioning: str | None = None
    notes: tuple[str, ...] = ()

    @property
    def analyzer(self) -> FaceAnalyzer:
        return self.spaces[0][1]

    @property
    def who(self) -> IdentityFaces:
        return self.spaces[0][2]

    def as_dict(self) -> dict[str, Any]:
        return {"ranking_space": self.analyzer.backend, "conditioning_space": self.conditioning,
                "spaces": {a.backend: role for role, a, _ in self.spaces},
                "self_similarity": {k: v.as_dict() for k, v in self.spreads.items()},
                "notes": list(self.notes)}


def independent_space(ctx, conditioning: str | None) -> str:
    """The first present, licensed space that did not condition the output (dlib offline).

    Only real models count: a tiny stand-in's identities are meaningless by design.
    """
    from portrait.core.licenses import allowed

    for space in score_stage.INDEPENDENT:
        if space == conditioning:
            continue
        if space == "dlib":
            return space
        model = space.split(":", 1)[1] if ":" in space else space
        if allowed(ctx.registry, model, ctx.settings.license) and ctx.registry.is_present(model, ctx.settings):
            return space
    return "dlib"


def selection_space(identity: Identity) -> str | None:
    """The embedding space whose similarity picked the identity's LoRA checkpoints: the space
    its training validated likeness in (manifest train.validation.space), or for bundles from
    before that record, the face backend of its prepare."""
    validation = (identity.manifest.get("train") or {}).get("validation") or {}
    return validation.get("space") or identity.manifest.get("face_backend")


def conditioning_space(backend: str, options: Mapping[str, Any], selection_space: str | None) -> str | None:
    """The embedding space that shaped a run of `backend`, as its BackendSpec declares it (the
    LoRA backends: `selection_space`, the space whose similarity picked the LoRA's checkpoints)."""
    from portrait.stages.backends import BACKENDS

    spec = BACKENDS.get(backend)
    return spec.conditioning_space(options, selection_space) if spec is not None else selection_space


def scoring_for(ctx, identity: Identity, backend: str, options: Mapping[str, Any], policy: FinishPolicy,
                analyzer: FaceAnalyzer | None = None, who: IdentityFaces | None = None) -> Scoring:
    """The spaces that score a run of `backend` (see `Scoring`), built once per run.

    A given `analyzer` (or a preset `finish.face_backend` other than auto) fixes the ranking
    space; otherwise `score.rank_space` picks the independent space (default) or the
    conditioning one.
    """
    conditioning = conditioning_space(backend, options, selection_space(identity))
    if analyzer is not None:
        ranking = analyzer.backend
    elif policy.face_backend != "auto":
        ranking = pick_backend(policy.face_backend, ctx.registry, ctx.settings)
    elif policy.score.rank_space == "conditioning" and conditioning:
        ranking = conditioning
    else:
        ranking = independent_space(ctx, conditioning)
    analyzer = analyzer or make_analyzer(ctx, ranking)
    if who is None or who.space != analyzer.backend:
        who = identity_faces(analyzer, identity)
    spaces = [("conditioning" if ranking == conditioning else "independent", analyzer, who)]
    notes = []
    if conditioning and conditioning != ranking:
        try:
            other = make_analyzer(ctx, conditioning)
            spaces.append(("conditioning", other, identity_faces(other, identity)))
        except (ModelMissing, BadInput) as exc:  # absent or refused by the license policy
            notes.append(f"conditioning space {conditioning} not scored: {exc}")
    own = own_photos(identity, [(a, w) for _, a, w in spaces])
    stored = identity.manifest.get("self_similarity") or {}
    spreads = {}
    for _, a, _ in spaces:
        if a.backend in stored:
            spreads[a.backend] = score_stage.Spread.from_dict(a.backend, stored[a.backend])
        else:
            found = score_stage.self_spread([p.embeddings[a.backend] for p in own
                                             if p.name != "reference" and a.backend in p.embeddings], a.backend)
            if found is not None:
                spreads[a.backend] = found
    return Scoring(tuple(spaces), tuple(own), spreads, conditioning, tuple(notes))


def own_photos(identity: Identity, analyzers: Sequence[tuple[FaceAnalyzer, IdentityFaces]]) -> list[score_stage.OwnPhoto]:
    """The identity's photos (and reference) as the copy-paste guard sees them: each face's
    signature in the first analyzer's detection and its embedding in every space."""
    out = []
    paths = [("reference", identity.reference)] + [(p.name, p) for p in identity.photos]
    for name, path in paths:
        if not Path(path).is_file():
            continue
        image = read_rgb(path)
        signature, embeddings = None, {}
        for index, (analyzer, _) in enumerate(analyzers):
            faces = analyzer.detect(image)
            if not faces:
                continue
            if index == 0:
                signature = score_stage.face_signature(image, faces[0])
            if faces[0].embedding is not None:
                embeddings[analyzer.backend] = faces[0].embedding
        out.append(score_stage.OwnPhoto(name, signature, embeddings))
    return out


def photo_spreads(ctx, spaces: Sequence[str], photos: Sequence[Path]) -> dict[str, dict[str, Any]]:
    """Per space, the pairwise same-person similarity spread of `photos` (stored in the bundle)."""
    out = {}
    for space in spaces:
        try:
            analyzer = make_analyzer(ctx, space)
        except (ModelMissing, BadInput):
            continue
        embeddings = []
        for path in photos:
            faces = analyzer.detect(read_rgb(path))
            if faces and faces[0].embedding is not None:
                embeddings.append(faces[0].embedding)
        spread = score_stage.self_spread(embeddings, space)
        if spread is not None:
            out[space] = spread.as_dict()
    return out


# --- finish -------------------------------------------------------------------------------------


@contextlib.contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    """Add the block's wall time to timings[name] (seconds)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = round(timings.get(name, 0.0) + time.perf_counter() - start, 4)


@dataclass
class _Finishers:
    """What finishing loads once per call (all through the RunContext's cache)."""

    policy: FinishPolicy
    analyzer: FaceAnalyzer
    who: IdentityFaces
    scoring: Scoring | None = None
    ctx: Any = None
    identity: Identity | None = None
    people: dict[str, IdentityFaces] = field(default_factory=dict)  # a group's other identities, by name
    swap_embeddings: dict[str, np.ndarray] = field(default_factory=dict)
    parser: Any = None
    swapper: Any = None
    swap_embedding: np.ndarray | None = None
    upscaler: Any = None
    restorer: Any = None
    clip: Any = None
    notes: list[str] = field(default_factory=list)


def finish(ctx, identity: Identity, candidates: Sequence[Candidate], switches: FinishSwitches | None = None,
           policy: FinishPolicy | None = None, analyzer: FaceAnalyzer | None = None,
           who: IdentityFaces | None = None, scoring: Scoring | None = None) -> list[RankedResult]:
    """Fuse, retouch, upscale, restore and score each candidate; return them ranked.

    `analyzer` and `who` (the identity's faces in that analyzer's space), or a whole
    `scoring`, may be passed in by a caller that finishes several batches, so they are
    computed once. A given `analyzer` is the ranking space.
    """
    policy = policy or FinishPolicy.from_preset(ctx.preset)
    switches = switches or FinishSwitches.from_options(policy.switches)
    if not candidates:
        return []
    if scoring is None and switches.score:
        request = candidates[0].request
        scoring = scoring_for(ctx, identity, request.backend, request.options, policy, analyzer, who)
    if scoring is not None:
        analyzer, who = scoring.analyzer, scoring.who
    kit = _prepare(ctx, identity, switches, policy, analyzer, who)
    kit.scoring = scoring
    finished = []
    for index, candidate in enumerate(candidates):
        finished.append(_finish_one(candidate, switches, kit))
        ctx.progress("finish", index + 1, len(candidates))
    backend = candidates[0].request.backend
    threshold = policy.score.threshold_for(backend, kit.analyzer.scale.threshold)
    scores = _score_all(finished, switches, kit, threshold)
    if not switches.score:  # nothing to rank by: generation order, no gate
        return [RankedResult(c, s, i + 1, True) for i, (c, s) in enumerate(zip(finished, scores))]
    return score_stage.rank(finished, scores, policy.score, threshold)


def finishing_plan(ctx, switches: FinishSwitches, policy: FinishPolicy):
    """What `_prepare` will put on the device for these switches, for the memory plan
    (portrait.stages.planning.Finishing): the face analysis pack (insightface or AuraFace; dlib
    runs on the CPU), the face parser, the swapper, the upscaler, the face restorer, the scoring
    CLIP; the preset roles that name none are left out, as `_prepare` skips them."""
    from portrait.core.faces import COMMERCIAL_BACKEND
    from portrait.stages.planning import Finishing

    models: list[str] = []
    try:
        face = pick_backend(policy.face_backend, ctx.registry, ctx.settings)
    except BadInput:
        face = "dlib"
    if face.startswith("insightface:"):
        models.append(face.split(":", 1)[1])
    elif face == COMMERCIAL_BACKEND:
        models.append("auraface")
    role = ctx.preset.models.get
    if policy.face_parsing and (switches.fuse or switches.retouch) and role("face_parser"):
        models.append(role("face_parser"))
    if switches.fuse and policy.fuse.method == "inswapper":
        models.append(SWAPPER)
    scale = 0
    if switches.upscale:
        scale = upscale_stage.native_scale_needed(policy.upscale.outscale)
        upscaler = role("upscaler_x2" if scale == 2 else "upscaler")
        if upscaler:
            models.append(upscaler)
        else:
            scale = 0
    # A restorer that cannot run here (no tiny stand-in under a tiny preset) is skipped by
    # `_prepare` with a warning, so it is not planned either (planning it refused the run).
    restore = switches.restore and bool(role("face_restorer")) and _runs_here(ctx, role("face_restorer"))
    if restore:
        models.append(role("face_restorer"))
    clip = switches.clip and switches.score and bool(role("clip"))
    if clip:
        models.append(role("clip"))
    return Finishing(tuple(models), scale, policy.upscale.tile, policy.upscale.overlap, restore=restore, clip=clip)


def _runs_here(ctx, model_id: str) -> bool:
    """Whether the preset can load `model_id` at all (a tiny preset needs its stand-in)."""
    try:
        ctx.registry.stand_in(model_id, ctx.preset.tiny)
    except BadInput:
        return False
    return True


def _prepare(ctx, identity: Identity, switches: FinishSwitches, policy: FinishPolicy,
             analyzer: FaceAnalyzer | None, who: IdentityFaces | None) -> _Finishers:
    analyzer = analyzer or make_analyzer(ctx, policy.face_backend)
    if who is None or who.space != analyzer.backend:
        who = identity_faces(analyzer, identity)
    kit = _Finishers(policy, analyzer, who, ctx=ctx, identity=identity, people={identity.name: who})
    if policy.face_parsing and (switches.fuse or switches.retouch):
        try:
            kit.parser = load_face_parser(ctx, ctx.preset.model("face_parser"))
        except (ModelMissing, BadInput) as exc:
            kit.notes.append(f"face parsing skipped, landmark masks used: {exc}")
    if switches.fuse and policy.fuse.method == "inswapper":
        kit.swapper = fuse_stage.load_swapper(ctx, SWAPPER)
        kit.swap_embedding = _swap_embedding(ctx, kit.who.reference_image, identity)
    if switches.upscale:
        role = "upscaler_x2" if upscale_stage.native_scale_needed(policy.upscale.outscale) == 2 else "upscaler"
        kit.upscaler = upscale_stage.load_model(ctx, ctx.preset.model(role))
    if switches.restore:
        kit.restorer, reason = upscale_stage.try_load_restorer(ctx, ctx.preset.model("face_restorer"))
        if kit.restorer is None:
            kit.notes.append(f"face restoration skipped: {reason}")
    if switches.clip and switches.score:
        try:
            kit.clip = score_stage.load_clip(ctx, ctx.preset.model("clip"))
        except ModelMissing as exc:
            kit.notes.append(f"CLIP-T skipped: {exc}")
    return kit


def assigned_faces(candidate: Candidate, image_shape: tuple[int, ...] | None = None) -> list[score_stage.AssignedFace]:
    """The faces a backend painted for named identities (photo templates), boxes scaled to `image_shape`."""
    rows = [f for f in candidate.info.get("faces") or [] if isinstance(f, dict) and f.get("box")]
    scale = 1.0
    if image_shape is not None and rows:
        scale = image_shape[1] / float(candidate.request.width)
    return [score_stage.AssignedFace(str(f["identity"]), int(f["face"]), tuple(float(v) * scale for v in f["box"]))
            for f in rows]


def _person(kit: _Finishers, name: str, candidate: Candidate) -> IdentityFaces:
    """A group member's faces in the analyzer's space (computed once per finish call). The
    member is one of the candidate's request's people: never a bundle opened by its name."""
    if name not in kit.people:
        kit.people[name] = identity_faces(kit.analyzer, candidate.request.person(name))
    return kit.people[name]


def _finish_one(candidate: Candidate, switches: FinishSwitches, kit: _Finishers) -> Candidate:
    timings = dict(candidate.timings)
    notes = list(kit.notes)
    image = candidate.image
    group = assigned_faces(candidate, image.shape)
    owners: list[str] = []
    with _timed(timings, "detect"):
        faces = kit.analyzer.detect(image, embed=False) if (switches.fuse or switches.retouch or switches.restore) else []
    if group and faces:  # only the assigned faces are finished; the template's other people stay as they are
        matched = score_stage.match_faces(faces, group)
        owners = [g.identity for g, f in zip(group, matched) if f is not None]
        faces = [f for f in matched if f is not None]
    labels = None
    if kit.parser is not None and faces and (switches.fuse or switches.retouch):
        with _timed(timings, "parse"):
            labels = kit.parser.parse(image, faces)
    if switches.fuse:
        if faces:
            try:
                with _timed(timings, "fuse"):
                    if group:  # each face with its own identity's reference; one failing face skips only itself
                        for face, owner in zip(faces, owners):
                            try:
                                image = _fuse(image, face, labels, candidate, kit, owner)
                            except BadInput as exc:
                                notes.append(f"fusion of {owner}'s face skipped: {exc}")
                    else:
                        image = _fuse(image, faces[0], labels, candidate, kit)
            except BadInput as exc:  # a generated image is not user input: note it, keep the batch going
                notes.append(f"fusion skipped: {exc}")
        else:
            notes.append("fusion skipped: no face in the candidate")
    if switches.retouch and faces:
        with _timed(timings, "retouch"):
            image = retouch_stage.retouch(image, faces, kit.policy.retouch, parsing=labels).image
    if switches.upscale and kit.upscaler is not None:
        with _timed(timings, "upscale"):
            result = upscale_stage.upscale(image, kit.upscaler, kit.policy.upscale, source=f"seed {candidate.seed}")
        faces = [_scaled(face, result.scale) for face in faces]
        image = result.image
    if switches.restore and kit.restorer is not None and faces:
        with _timed(timings, "restore"):
            image = upscale_stage.restore_faces(image, faces, kit.restorer, kit.policy.upscale.restore_weight)
    info = dict(candidate.info)
    if notes:
        info["finish_notes"] = notes
    info["finish"] = switches.as_dict()
    return dataclasses.replace(candidate, image=image, timings=timings, info=info)


def _fuse(image: np.ndarray, face: FaceObservation, labels: np.ndarray | None, candidate: Candidate,
          kit: _Finishers, owner: str | None = None) -> np.ndarray:
    seed = candidate.seed
    who = kit.who if owner is None else _person(kit, owner, candidate)
    if kit.swapper is not None:
        embedding = kit.swap_embedding
        if owner is not None and owner != kit.identity.name:
            if owner not in kit.swap_embeddings:
                person = candidate.request.person(owner)
                kit.swap_embeddings[owner] = _swap_embedding(kit.ctx, who.reference_image, person)
            embedding = kit.swap_embeddings[owner]
        return fuse_stage.swap_face(kit.swapper, image, face, embedding, target_name=f"seed {seed}")
    return fuse_stage.fuse(who.reference_image, who.reference_face, image, face, kit.policy.fuse,
                           target_name=f"seed {seed}", target_parsing=labels).image


def _swap_embedding(ctx, reference: np.ndarray, identity: Identity) -> np.ndarray:
    """The reference's buffalo_l embedding: the space inswapper was trained with."""
    stored = identity.consensus.get(SWAP_SPACE)
    if stored is not None:
        return np.asarray(stored, np.float32)
    faces = make_analyzer(ctx, SWAP_SPACE).detect(reference)
    return fuse_stage.require_face(faces, str(identity.reference)).embedding


def _scaled(face: FaceObservation, scale: float) -> FaceObservation:
    return dataclasses.replace(
        face,
        box=tuple(v * scale for v in face.box),
        kps=np.asarray(face.kps, np.float32) * scale,
        landmarks=None if face.landmarks is None else np.asarray(face.landmarks, np.float32) * scale,
    )


def _score_all(finished: list[Candidate], switches: FinishSwitches, kit: _Finishers,
               threshold: float = 0.0) -> list[CandidateScore]:
    if not switches.score:
        return [CandidateScore(0.0, 0.0, 0, 0.0, None) for _ in finished]
    clips: list[float | None] = [None] * len(finished)
    if kit.clip is not None:
        start = time.perf_counter()
        clips = score_stage.clip_t(kit.clip, [c.image for c in finished], [c.request.prompt for c in finished])
        share = round((time.perf_counter() - start) / len(finished), 4)
        for candidate in finished:
            candidate.timings["clip"] = share
    scoring = kit.scoring or Scoring((("independent", kit.analyzer, kit.who),))
    scores = []
    for candidate, clip in zip(finished, clips):
        start = time.perf_counter()
        group = assigned_faces(candidate, candidate.image.shape)
        if len(group) > 1:
            # A group picture: each assigned face against its own identity, in the analyzer's space
            # (the independent second space and the copy-paste guard score single portraits only).
            faces = kit.analyzer.detect(candidate.image)
            people = {g.identity: _person(kit, g.identity, candidate) for g in group}
            embeddings = {name: score_stage.IdentityEmbeddings(p.consensus, p.reference_embedding)
                          for name, p in people.items()}
            scored = score_stage.score_group(faces, candidate.image.shape, group, embeddings, kit.who.space,
                                             kit.policy.score, threshold, clip)
            scores.append(dataclasses.replace(scored, space=kit.who.space))
        else:
            scores.append(score_image(candidate.image, scoring, kit.policy.score, clip))
        candidate.timings["score"] = round(time.perf_counter() - start, 4)
    return scores


def score_image(image: np.ndarray, scoring: Scoring, policy: score_stage.ScorePolicy,
                clip: float | None = None) -> CandidateScore:
    """One image's score in every space of `scoring` (the first ranks), with the copy-paste check."""
    base, spaces, embeddings, signature, quality = None, {}, {}, None, {}
    for role, analyzer, who in scoring.spaces:
        faces = analyzer.detect(image)
        score = score_stage.score_faces(faces, image.shape, who.consensus, who.reference_embedding, who.space, clip)
        spaces[who.space] = {"role": role, "similarity": score.similarity,
                             "reference_similarity": score.reference_similarity, "faces": score.faces}
        if faces:
            face = max(faces, key=lambda f: f.area)
            embeddings[who.space] = face.embedding
            if base is None:
                signature = score_stage.face_signature(image, face)
                measured = analyze_stage.face_quality(image, face)  # as prepare judges an uploaded photo
                quality = {"sharpness": round(measured.sharpness, 4), "exposure": round(measured.exposure, 4)}
        if base is None:
            base = score
    reason = score_stage.copy_paste_reason(embeddings, signature, scoring.own, scoring.spreads, policy)
    return dataclasses.replace(base, space=scoring.who.space, spaces=spaces, copy_paste=reason, quality=quality)


# --- the gate -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class GateOutcome:
    results: list[RankedResult]  # the `want` best, re-ranked 1..n
    evaluated: int  # candidates scored in all
    rounds: int  # regeneration rounds run
    extra_seeds: tuple[int, ...]  # seeds generated beyond the first batch
    passed: bool  # every returned result passed the gate
    scoring: dict[str, Any] = field(default_factory=dict)  # Scoring.as_dict() of the run


GenerateMore = Callable[[list[int]], list[Candidate]]
Evaluate = Callable[[list[Candidate]], list[RankedResult]]


def run_gate(first: list[RankedResult], generate_more: GenerateMore, evaluate: Evaluate, want: int,
             budget: int, rounds: int) -> GateOutcome:
    """Regenerate while fewer than `want` results pass, within `budget` extra candidates and `rounds`.

    New seeds continue after the largest seed seen, so a rerun with the same first seed
    regenerates the same images.
    """
    pool = list(first)
    spent, done_rounds, extra = 0, 0, []
    while _count_passed(pool) < want and spent < budget and done_rounds < rounds:
        count = min(want - _count_passed(pool), budget - spent)
        start = max(r.candidate.seed for r in pool) + 1 if pool else 0
        seeds = list(range(start, start + count))
        fresh = generate_more(seeds)
        if not fresh:
            break
        spent += len(fresh)
        done_rounds += 1
        extra.extend(c.seed for c in fresh)
        pool.extend(evaluate(fresh))
    best = sorted(pool, key=lambda r: (not r.passed_gate, r.score.copy_paste is not None, _order_key(r)))[:want]
    results = [dataclasses.replace(r, rank=i + 1) for i, r in enumerate(best)]
    return GateOutcome(results, len(pool), done_rounds, tuple(extra), all(r.passed_gate for r in results))


def _count_passed(pool: Sequence[RankedResult]) -> int:
    return sum(1 for r in pool if r.passed_gate)


def _order_key(result: RankedResult) -> tuple:
    # ranks from different rounds are not comparable; similarity is (not measured: after every measured one)
    s = result.score
    return (s.similarity is None, -(s.similarity or 0.0), -(s.reference_similarity or 0.0), result.candidate.seed)


def gate(ctx, identity: Identity, candidates: Sequence[Candidate], switches: FinishSwitches | None,
         generate_more: GenerateMore, want: int | None = None, policy: FinishPolicy | None = None) -> GateOutcome:
    """finish + run_gate with the preset's budget; the generate flow's single call."""
    policy = policy or FinishPolicy.from_preset(ctx.preset)
    switches = switches or FinishSwitches.from_options(policy.switches)
    scoring = None
    if switches.score and candidates:
        request = candidates[0].request
        scoring = scoring_for(ctx, identity, request.backend, request.options, policy)

    def evaluate(batch: list[Candidate]) -> list[RankedResult]:
        return finish(ctx, identity, batch, switches, policy, scoring=scoring)

    first = evaluate(list(candidates))
    want = want or len(candidates)
    if not switches.score:
        return GateOutcome(first[:want], len(first), 0, (), True)
    outcome = run_gate(first, generate_more, evaluate, want, policy.score.budget, policy.score.rounds)
    return dataclasses.replace(outcome, scoring=scoring.as_dict() if scoring else {})


# --- keep: a promised number of good portraits ------------------------------------------------------


@dataclass(frozen=True)
class KeepOutcome:
    results: list[RankedResult]  # the kept portraits, best first, ranked 1..k (k <= wanted)
    report: dict[str, Any]  # the keep report of results.json (see keep_gate)
    scoring: dict[str, Any] = field(default_factory=dict)


def keep_budget(policy: FinishPolicy, keep: int, attempts: int | None = None) -> int:
    """How many candidates `--keep K` may try in all: `attempts` when given, else K x
    score.keep_attempts; never more than score.keep_max_attempts nor fewer than K."""
    limit = policy.score.keep_max_attempts
    if keep < 1:
        raise BadInput(f"--keep {keep}: keep at least 1")
    if keep > limit:
        raise BadInput(f"--keep {keep}: at most {limit} (preset key score.keep_max_attempts)")
    if attempts is not None:
        if not keep <= attempts <= limit:
            raise BadInput(f"--attempts {attempts}: from --keep ({keep}) to {limit} (preset key "
                           f"score.keep_max_attempts)")
        return attempts
    return min(keep * policy.score.keep_attempts, limit)


def keep_gate(ctx, identity: Identity, candidates: Sequence[Candidate], switches: FinishSwitches,
              generate_more: GenerateMore, keep: int, policy: FinishPolicy | None = None,
              attempts: int | None = None) -> KeepOutcome:
    """Generate until `keep` outputs are portraits to keep, within the attempt budget.

    An output is kept when score.keep_reasons finds nothing wrong: one face of a judgeable
    size, at or above the similarity gate in the *independent* space (ranking moves there
    whatever the preset's rank_space says: a backend cannot vouch for its own likeness), not
    a copy of one of the identity's photos, and a face crop sharp and well exposed enough.
    Each round asks for the missing number scaled by the pass rate seen so far (so a backend
    that keeps one in three is asked for three per missing portrait), with new seeds after the
    largest tried, until enough are kept or the budget is spent. The report says how many were
    tried and kept and why each other one was dropped (docs/ARCHITECTURE.md#keep-report).
    """
    policy = policy or FinishPolicy.from_preset(ctx.preset)
    if not switches.score:
        raise BadInput("--keep needs scoring to judge the portraits: leave finishing on (no --no-finish)")
    if not candidates:
        raise BadInput("--keep: the backend made no candidate")
    budget = keep_budget(policy, keep, attempts)
    policy = dataclasses.replace(policy, score=dataclasses.replace(policy.score, rank_space="independent"))
    request = candidates[0].request
    scoring = scoring_for(ctx, identity, request.backend, request.options, policy)
    judge = next(((a, w) for role, a, w in scoring.spaces if role == "independent"), None)
    notes = []
    if judge is None:  # the preset fixed a face backend that is the conditioning space
        judge = (scoring.analyzer, scoring.who)
        notes.append(f"no independent space could score this backend; kept by {scoring.analyzer.backend}")
    space = judge[1].space
    threshold = policy.score.threshold_for(request.backend, judge[0].scale.threshold)
    kept: list[RankedResult] = []
    dropped: list[dict[str, Any]] = []
    tried, rounds = 0, 0
    batch = list(candidates)[:budget]
    seeds: list[int] = []
    while batch:
        tried += len(batch)
        seeds += [c.seed for c in batch]
        for result in finish(ctx, identity, batch, switches, policy, scoring=scoring):
            reasons = score_stage.keep_reasons(result.score, policy.score, threshold, space)
            if reasons:
                dropped.append({"seed": result.candidate.seed, "reasons": reasons,
                                "similarity": result.score.similarity})
            else:
                kept.append(result)
        missing = keep - len(kept)
        if missing <= 0 or tried >= budget:
            break
        # the pass rate so far decides how many to ask for (at least the missing number,
        # at most four per missing one, never past the budget)
        per_kept = tried / len(kept) if kept else 4.0
        ask = min(budget - tried, max(missing, min(4 * missing, math.ceil(missing * per_kept))))
        start = max(seeds) + 1
        batch = list(generate_more(list(range(start, start + ask))))[: budget - tried]
        rounds += 1
    best = sorted(kept, key=lambda r: (-score_stage.rank_key(r.score, policy.score), r.candidate.seed))
    results = [dataclasses.replace(r, rank=i + 1) for i, r in enumerate(best[:keep])]
    counts: dict[str, int] = {}
    for row in dropped:
        for reason in row["reasons"]:
            counts[reason] = counts.get(reason, 0) + 1
    report = {
        "wanted": keep, "kept": len(results), "tried": tried, "budget": budget, "rounds": rounds,
        "complete": len(results) >= keep, "surplus": max(0, len(kept) - keep),
        "checks": {"space": space, "threshold": round(float(threshold), 4), "faces": policy.score.expected_faces,
                   "min_sharpness": policy.score.keep_min_sharpness, "min_exposure": policy.score.keep_min_exposure,
                   "copy_paste": True},
        "reasons": dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))),
        "dropped": dropped, "notes": notes,
    }
    report["summary"] = keep_summary(report)
    return KeepOutcome(results, report, scoring.as_dict())


def keep_summary(report: Mapping[str, Any]) -> str:
    """The keep report in one line a person reads: `kept 2 of 2 (tried 5); dropped: no face in
    the picture (2), did not look enough like the person (1)`."""
    head = f"kept {report['kept']} of {report['wanted']} (tried {report['tried']}"
    head += ")" if report.get("complete") else f", all the budget allows)"
    reasons = report.get("reasons") or {}
    if not reasons:
        return head
    return f"{head}; dropped: " + ", ".join(f"{score_stage.KEEP_REASONS.get(k, k)} ({n})" for k, n in reasons.items())


# --- reporting -----------------------------------------------------------------------------------


def result_tiles(results: Sequence[RankedResult]) -> list[Tile]:
    """The candidates in rank order, each captioned with its scores (green = passed the gate);
    a group picture's assigned faces are boxed green/red by their own gate."""
    tiles = []
    for result in results:
        s = result.score
        colour = (60, 190, 90) if result.passed_gate else (220, 70, 60)
        clip = f"  clip {s.clip_t:.3f}" if s.clip_t is not None else ""
        boxes = tuple(FaceBox(tuple(face.box), (60, 190, 90) if face.passed else (220, 70, 60),
                              f"{face.identity} {_num(face.similarity, '.2f')}") for face in s.per_face
                      if face.box is not None)
        measured = (f"id {_num(s.similarity)}  ref {_num(s.reference_similarity)}" if s.similarity is not None
                    else "no face")
        lines = ((f"#{result.rank}  seed {result.candidate.seed}  faces {s.faces}", (235, 235, 235)),
                 (f"{measured}{clip}", colour),
                 ("passed" if result.passed_gate else "below gate", colour))
        tiles.append(Tile(result.candidate.image, lines, frame=colour, boxes=boxes))
    return tiles


def _num(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(float(value), spec)


def write_results_sheet(target: Path, results: Sequence[RankedResult], thumb: int = 256, columns: int = 4) -> Path:
    """generate's contact sheet (portrait.core.formats.sheet draws it)."""
    if not results:
        raise BadInput(f"{target}: no candidates to put on a contact sheet")
    return write_contact_sheet(target, result_tiles(results), thumb=thumb, columns=columns)
