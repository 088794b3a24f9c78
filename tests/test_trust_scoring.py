"""Independent scoring and the copy-paste guard (issue 18), on real photos with real dlib.

The identity is a zero-shot bundle trained from the sample photos (several shots of the
astronaut); InstantID-style candidates are conditioned on antelopev2 (its tiny stand-in
here), so they are scored there and in dlib's space, and dlib ranks them.
"""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest

from portrait.core.config import Settings
from portrait.core.types import Candidate, CandidateScore, GenerationRequest, Identity
from portrait.flows.finish import FinishPolicy, FinishSwitches, finish, scoring_for
from portrait.stages import score as sc

SCORE_ONLY = FinishSwitches(fuse=False, retouch=False, upscale=False, restore=False, score=True, clip=False)


@pytest.fixture(scope="module")
def home(tmp_path_factory, tiny_home) -> Settings:
    root = tmp_path_factory.mktemp("trust-home")
    (root / "models").symlink_to(tiny_home.models_dir, target_is_directory=True)
    return Settings(home=root, preset="tiny", device="cpu")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    from portrait.samples import write_sample_photos

    folder = tmp_path_factory.mktemp("photos")
    write_sample_photos(folder, bad_file=False)
    return folder


@pytest.fixture(scope="module")
def astro(home, photos) -> Identity:
    from portrait.flows.train import train

    return train(photos, "astro", settings=home, zero_shot=True)


@pytest.fixture(scope="module")
def ctx(home):
    from portrait.core.context import RunContext

    return RunContext.create(home, preset="tiny")


def _small(image: np.ndarray, side: int = 256) -> np.ndarray:
    from PIL import Image

    h, w = image.shape[:2]
    scale = side / max(h, w)
    return np.asarray(Image.fromarray(image).resize((round(w * scale), round(h * scale)), Image.LANCZOS))


def _candidate(identity: Identity, image: np.ndarray, seed: int, backend: str = "instantid") -> Candidate:
    request = GenerationRequest(identity=identity, backend=backend, template=None, prompt="a photo of sks woman",
                                negative_prompt="", width=image.shape[1], height=image.shape[0], steps=4,
                                guidance=5.0, scheduler="euler", seed=seed, n=1)
    return Candidate(image=image, seed=seed, request=request)


def test_the_bundle_stores_its_own_photo_to_photo_spread_per_space(astro):
    spreads = astro.manifest["self_similarity"]
    assert "dlib" in spreads and "insightface:antelopev2" in spreads
    dlib = spreads["dlib"]
    assert dlib["n"] == len(astro.photos) >= 4
    assert 0.0 <= dlib["min"] <= dlib["median"] <= dlib["max"] <= 1.0


def test_independent_score_differs_from_the_conditioning_score_and_ranks(ctx, astro, astronaut, hopper, t1_group):
    policy = FinishPolicy.from_preset(ctx.preset)
    scoring = scoring_for(ctx, astro, "instantid", {}, policy)
    assert scoring.conditioning == "insightface:antelopev2"
    assert [(role, a.backend) for role, a, _ in scoring.spaces] == [
        ("independent", "dlib"), ("conditioning", "insightface:antelopev2")]
    images = [_small(astronaut), _small(hopper), _small(np.ascontiguousarray(astronaut[:, ::-1])),
              _small(t1_group[40:300, 250:560]), _small(astronaut[60:300, 120:360])]
    candidates = [_candidate(astro, image, seed) for seed, image in enumerate(images)]
    ranked = finish(ctx, astro, candidates, SCORE_ONLY, policy, scoring=scoring)
    by_seed = {r.candidate.seed: r.score for r in ranked}
    for score in by_seed.values():
        assert set(score.spaces) == {"dlib", "insightface:antelopev2"}
        assert score.space == "dlib" and score.similarity == score.spaces["dlib"]["similarity"]
    independent = {s: v.spaces["dlib"]["similarity"] for s, v in by_seed.items()}
    conditioning = {s: v.spaces["insightface:antelopev2"]["similarity"] for s, v in by_seed.items()}
    # the two recognizers disagree: what the conditioning space likes is not what dlib sees
    assert max(abs(independent[s] - conditioning[s]) for s in by_seed) > 0.2
    assert independent[1] < 0.2 < independent[0], "dlib tells Hopper from the astronaut"
    # ranking and the gate follow the independent score ...
    order = [r.candidate.seed for r in ranked]
    threshold = scoring.analyzer.scale.threshold
    assert [r.passed_gate for r in ranked] == [sc.passes(r.score, policy.score, threshold) for r in ranked]
    passed = [s for s in order if by_seed[s].similarity >= threshold and sc.is_sane(by_seed[s], policy.score)]
    assert order[:len(passed)] == sorted(passed, key=lambda s: (by_seed[s].copy_paste is not None,
                                                                -sc.rank_key(by_seed[s], policy.score)))
    assert order[0] in (2, 4) and 1 not in order[:len(passed)] and 3 not in order[:len(passed)]
    # the untouched original is one of the bundle's own photos: flagged, and ranked after the clean ones
    assert "reproduces" in by_seed[0].copy_paste and order.index(0) == len(passed) - 1
    assert by_seed[0].similarity > by_seed[2].similarity
    # ... and the preset can ask for the conditioning space instead, which orders them otherwise
    by_conditioning = dataclasses.replace(policy, score=dataclasses.replace(policy.score, rank_space="conditioning"))
    other = scoring_for(ctx, astro, "instantid", {}, by_conditioning)
    assert other.analyzer.backend == "insightface:antelopev2"
    reranked = finish(ctx, astro, candidates, SCORE_ONLY, by_conditioning, scoring=other)
    assert [r.candidate.seed for r in reranked] != order


def test_copy_paste_by_similarity_above_the_identity_spread():
    rng = np.random.default_rng(0)
    base = rng.normal(size=512)
    own = [base + rng.normal(size=512) for _ in range(4)]  # one person: cosine ~0.5 between photos
    spread = sc.self_spread(own, "auraface")
    assert 0.3 < spread.median < 0.7
    photos = [sc.OwnPhoto(f"{i:03d}.jpg", None, {"auraface": e}) for i, e in enumerate(own)]
    policy = sc.ScorePolicy()
    copied = own[2] + rng.normal(size=512) * 0.05
    reason = sc.copy_paste_reason({"auraface": copied}, None, photos, {"auraface": spread}, policy)
    assert reason is not None and "002.jpg" in reason and "auraface" in reason
    rendered = base + rng.normal(size=512)  # the same person, rendered anew
    assert sc.copy_paste_reason({"auraface": rendered}, None, photos, {"auraface": spread}, policy) is None
    too_few = sc.Spread("auraface", 2, 0.5, 0.5, 0.5)
    assert sc.copy_paste_reason({"auraface": copied}, None, photos, {"auraface": too_few}, policy) is None


def test_copy_paste_ranks_after_a_clean_output_of_equal_similarity(astro, astronaut):
    policy = sc.ScorePolicy()
    clean = CandidateScore(0.8, 0.8, 1, 0.1, space="dlib")
    copied = dataclasses.replace(clean, copy_paste="reproduces 000.jpg")
    ranked = sc.rank([_candidate(astro, astronaut, 1), _candidate(astro, astronaut, 2)], [copied, clean], policy, 0.5)
    assert [r.candidate.seed for r in ranked] == [2, 1]
    assert ranked[1].score.copy_paste == "reproduces 000.jpg" and ranked[1].passed_gate


def test_a_copied_photo_in_a_results_folder_is_flagged_and_a_fused_face_is_not(home, photos, astro, hopper, tmp_path):
    from PIL import Image

    from portrait.core.faces import make_analyzer
    from portrait.core.registry import Registry
    from portrait.flows.evaluate import evaluate
    from portrait.flows.generate import generate
    from portrait.stages import fuse as fuse_stage

    out = tmp_path / "run"
    generate("astro", prompt="a photo of sks woman", backend="faceid", n=1, seed=3, out=out, settings=home,
             finish=False)
    shutil.copyfile(photos / "astronaut_crop.jpg", out / "copied.jpg")  # a user's own photo, dropped in
    analyzer = make_analyzer(None, "dlib", registry=Registry.load(), settings=home)
    reference = np.asarray(Image.open(astro.reference).convert("RGB"))
    target = _small(hopper, 384)
    fused = fuse_stage.fuse(reference, analyzer.detect(reference)[0], target, analyzer.detect(target)[0],
                            fuse_stage.FusePolicy()).image
    Image.fromarray(fused).save(out / "fused.png")

    report = evaluate([out], settings=home)
    rows = {r["image"].rsplit("/", 1)[-1]: r for r in report.data["rows"]}
    assert not rows["copied.jpg"]["listed"] and not rows["fused.png"]["listed"]
    assert rows["copied.jpg"]["copy_paste"] and "reproduces" in rows["copied.jpg"]["copy_paste"]
    assert rows["fused.png"]["faces"] == 1 and rows["fused.png"]["copy_paste"] is None
    assert rows["copied.jpg"]["similarity"] > rows["fused.png"]["similarity"]  # the flag is not a low score
    assert report.data["overall"]["copy_paste"] == 1
    assert (out / "eval" / "index.html").is_file() and (out / "eval" / "eval.json").is_file()
