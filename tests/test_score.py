"""Scoring, ranking, CLIP-T, the finishing flow and the similarity gate, on real photos."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from portrait.core.errors import BadInput
from portrait.core.formats.results import results_row
from portrait.core.types import Candidate, CandidateScore, GenerationRequest, Identity, RankedResult
from portrait.flows.finish import (
    FinishPolicy,
    FinishSwitches,
    finish,
    gate,
    run_gate,
    write_results_sheet,
)
from portrait.stages import score as sc

NO_FINISH = FinishSwitches(fuse=False, retouch=False, upscale=False, restore=False, score=True, clip=False)






@pytest.fixture(scope="module")
def analyzer(finish_ctx):
    from portrait.core.faces import make_analyzer

    return make_analyzer(finish_ctx, "dlib")


def _small(image: np.ndarray, side: int = 256) -> np.ndarray:
    from PIL import Image

    h, w = image.shape[:2]
    scale = side / max(h, w)
    return np.asarray(Image.fromarray(image).resize((round(w * scale), round(h * scale)), Image.LANCZOS))


@pytest.fixture(scope="module")
def astronaut_identity(tmp_path_factory, astronaut) -> Identity:
    """An identity bundle made of the astronaut's photo only (no consensus stored: computed)."""
    from portrait.core.io import write_image

    root = tmp_path_factory.mktemp("identity")
    write_image(root / "reference.png", astronaut)
    return Identity(name="astro", root=root, trigger="sks", class_word="woman", reference=root / "reference.png",
                    photos=(), consensus={}, loras={}, manifest={})


def _candidate(identity: Identity, image: np.ndarray, seed: int, prompt: str = "a photo of sks woman") -> Candidate:
    request = GenerationRequest(identity=identity, backend="faceid", template=None, prompt=prompt,
                                negative_prompt="", width=image.shape[1], height=image.shape[0], steps=4,
                                guidance=5.0, scheduler="euler", seed=seed, n=1)
    return Candidate(image=image, seed=seed, request=request, timings={"generate": 0.1})


def test_score_faces_on_real_photos(analyzer, astronaut, hopper, t1_group):
    consensus = analyzer.detect(astronaut)[0].embedding
    policy = sc.ScorePolicy()
    same = sc.score_faces(analyzer.detect(astronaut), astronaut.shape, consensus, consensus, "dlib")
    other = sc.score_faces(analyzer.detect(hopper), hopper.shape, consensus, consensus, "dlib")
    group = sc.score_faces(analyzer.detect(t1_group), t1_group.shape, consensus, consensus, "dlib")
    empty = sc.score_faces([], (64, 64, 3), consensus, None, "dlib")
    assert same.similarity > 0.95 and same.faces == 1 and sc.is_sane(same, policy)
    assert other.similarity < 0.2 and sc.is_sane(other, policy)
    assert group.faces >= 5 and not sc.is_sane(group, policy)
    assert empty == CandidateScore(None, None, 0, 0.0, None)  # no face: not measured, not 0.0
    threshold = policy.threshold_for("faceid", analyzer.scale.threshold)
    assert sc.passes(same, policy, threshold) and not sc.passes(other, policy, threshold)
    assert sc.ScorePolicy(thresholds={"instantid": 0.7}).threshold_for("instantid", 0.5) == 0.7


def test_rank_puts_passing_sane_candidates_first(astronaut_identity):
    image = np.zeros((8, 8, 3), np.uint8)
    cands = [_candidate(astronaut_identity, image, seed) for seed in range(4)]
    scores = [CandidateScore(0.9, 0.9, 2, 0.2), CandidateScore(0.3, 0.3, 1, 0.2),
              CandidateScore(0.7, 0.6, 1, 0.2), CandidateScore(0.6, 1.0, 1, 0.2)]
    ranked = sc.rank(cands, scores, sc.ScorePolicy(), threshold=0.5)
    # 3 ranks over 2 by the reference share (0.70 vs 0.675); 0 has two faces, so it is last
    assert [r.candidate.seed for r in ranked] == [3, 2, 1, 0]
    assert [r.passed_gate for r in ranked] == [True, True, False, False]
    assert [r.rank for r in ranked] == [1, 2, 3, 4]


def test_clip_t_reads_the_prompt(finish_ctx, astronaut):
    clip = sc.load_clip(finish_ctx, "clip-vit-large-patch14")
    assert sc.load_clip(finish_ctx, "clip-vit-large-patch14") is clip
    values = sc.clip_t(clip, [astronaut, astronaut], ["a photo of an astronaut", "a bowl of soup <lora:x:0.8>"])
    again = sc.clip_t(clip, [astronaut], ["a photo of an astronaut"])
    assert all(-1.0 <= v <= 1.0 for v in values)
    assert values[0] == again[0] and values[0] != values[1]
    assert sc.clean_prompt("a <lora:me_v1:0.7> photo  of sks") == "a photo of sks"


def test_finish_runs_every_stage_and_times_it(finish_ctx, analyzer, astronaut_identity, hopper):
    """Fusion turns Hopper into the astronaut, so the gate passes; every stage is timed."""
    target = _small(hopper, 320)
    candidates = [_candidate(astronaut_identity, target, 11)]
    switches = FinishSwitches(fuse=True, retouch=True, upscale=True, restore=True, score=True, clip=True)
    # EasyPhoto's skin ratio 0.6 assumes the target already resembles the person; a stranger
    # needs more of the reference's skin to cross the gate (0.6 gives ~0.48 here, 0.8 ~0.8)
    policy = FinishPolicy.from_preset(finish_ctx.preset)
    policy = dataclasses.replace(policy, fuse=dataclasses.replace(policy.fuse, skin_ratio=0.8))
    ranked = finish(finish_ctx, astronaut_identity, candidates, switches, policy=policy, analyzer=analyzer)
    plain = finish(finish_ctx, astronaut_identity, candidates, NO_FINISH, analyzer=analyzer)
    (result,), (untouched,) = ranked, plain
    print(f"similarity to the identity: fused {result.score.similarity:.3f}, unfused {untouched.score.similarity:.3f}")
    assert result.score.similarity > untouched.score.similarity + 0.2
    assert result.passed_gate and not untouched.passed_gate
    assert result.candidate.image.shape == (2 * target.shape[0], 2 * target.shape[1], 3)  # preset outscale 2
    assert {"generate", "detect", "fuse", "retouch", "upscale", "score", "clip"} <= set(result.candidate.timings)
    assert result.score.clip_t is not None
    assert any("face restoration skipped" in note for note in result.candidate.info["finish_notes"])
    assert np.array_equal(candidates[0].image, target)  # the candidate itself is not modified
    row = results_row(result)
    assert {"path", "seed", "rank", "similarity", "passed_gate", "timings", "clip_t", "reference_similarity"} <= set(row)


def test_finish_uses_the_face_parser_when_the_preset_asks(finish_ctx, analyzer, astronaut_identity, hopper):
    policy = dataclasses.replace(FinishPolicy.from_preset(finish_ctx.preset), face_parsing=True)
    switches = FinishSwitches(fuse=True, retouch=True, upscale=False, clip=False)
    (result,) = finish(finish_ctx, astronaut_identity, [_candidate(astronaut_identity, _small(hopper), 3)], switches,
                       policy=policy, analyzer=analyzer)
    assert {"parse", "fuse", "retouch"} <= set(result.candidate.timings)
    assert "finish_notes" not in result.candidate.info


def test_finish_can_fuse_with_the_optional_inswapper(finish_ctx, analyzer, astronaut_identity, hopper):
    policy = FinishPolicy.from_preset(finish_ctx.preset)
    policy = dataclasses.replace(policy, fuse=dataclasses.replace(policy.fuse, method="inswapper"))
    target = _small(hopper)
    switches = FinishSwitches(fuse=True, retouch=False, upscale=False, clip=False)
    (result,) = finish(finish_ctx, astronaut_identity, [_candidate(astronaut_identity, target, 4)], switches,
                       policy=policy, analyzer=analyzer)
    assert "fuse" in result.candidate.timings and "finish_notes" not in result.candidate.info
    assert not np.array_equal(result.candidate.image, target)
    with pytest.raises(BadInput, match="finish.fuse.method"):
        FinishPolicy.from_preset(finish_ctx.preset).fuse.from_section({"method": "deepfake"})


def test_finish_keeps_faceless_candidates_and_ranks_them_last(finish_ctx, analyzer, astronaut_identity, astronaut):
    faceless = np.full((96, 96, 3), 90, np.uint8)
    cands = [_candidate(astronaut_identity, faceless, 1), _candidate(astronaut_identity, _small(astronaut), 2)]
    ranked = finish(finish_ctx, astronaut_identity, cands, FinishSwitches(upscale=False, clip=False), analyzer=analyzer)
    assert [r.candidate.seed for r in ranked] == [2, 1]
    assert ranked[1].score.faces == 0 and not ranked[1].passed_gate
    assert ranked[1].score.similarity is None and ranked[1].score.reference_similarity is None  # not measured: no face
    assert "fusion skipped: no face in the candidate" in ranked[1].candidate.info["finish_notes"]


def test_reference_without_a_face_is_bad_input(finish_ctx, analyzer, tmp_path, hopper):
    from portrait.core.io import write_image

    write_image(tmp_path / "reference.png", np.full((120, 120, 3), 200, np.uint8))
    faceless = Identity(name="x", root=tmp_path, trigger="sks", class_word="person",
                        reference=tmp_path / "reference.png", photos=(), consensus={}, loras={}, manifest={})
    with pytest.raises(BadInput, match=r"reference\.png: no face found$") as err:
        finish(finish_ctx, faceless, [_candidate(faceless, _small(hopper), 1)], NO_FINISH, analyzer=analyzer)
    assert err.value.exit_code == 2


def test_gate_regenerates_below_threshold_and_stops_at_the_budget(finish_ctx, astronaut_identity, hopper):
    """Hopper never passes for the astronaut: the gate spends its budget, then returns the best."""
    strangers = _small(hopper, 200)
    asked: list[list[int]] = []

    def generate_more(seeds):
        asked.append(list(seeds))
        return [_candidate(astronaut_identity, strangers, s) for s in seeds]

    policy = dataclasses.replace(FinishPolicy.from_preset(finish_ctx.preset),
                                 score=sc.ScorePolicy(budget=3, rounds=5))
    first = [_candidate(astronaut_identity, strangers, seed) for seed in (100, 101)]
    outcome = gate(finish_ctx, astronaut_identity, first, NO_FINISH, generate_more, policy=policy)
    assert asked == [[102, 103], [104]]  # 2 missing, then the last 1 of a budget of 3
    assert outcome.evaluated == 5 and outcome.rounds == 2 and outcome.extra_seeds == (102, 103, 104)
    assert len(outcome.results) == 2 and not outcome.passed
    assert [r.rank for r in outcome.results] == [1, 2]
    assert all(not r.passed_gate for r in outcome.results)


def test_gate_stops_as_soon_as_enough_pass(finish_ctx, astronaut_identity, astronaut, hopper):
    asked = []

    def generate_more(seeds):
        asked.append(list(seeds))
        return [_candidate(astronaut_identity, _small(astronaut, 200), s) for s in seeds]

    first = [_candidate(astronaut_identity, _small(hopper, 200), 7)]
    outcome = gate(finish_ctx, astronaut_identity, first, NO_FINISH, generate_more)
    assert asked == [[8]] and outcome.passed
    assert outcome.results[0].candidate.seed == 8 and outcome.results[0].passed_gate


def _ranked(seed: int, sim: float, passed: bool) -> RankedResult:
    request = GenerationRequest(identity=None, backend="lora", template=None, prompt="p", negative_prompt="",
                                width=8, height=8, steps=1, guidance=1.0, scheduler="euler", seed=seed, n=1)
    cand = Candidate(image=np.zeros((8, 8, 3), np.uint8), seed=seed, request=request)
    return RankedResult(cand, CandidateScore(sim, sim, 1, 0.2), 1, passed)


def test_run_gate_without_budget_or_with_a_dry_generator():
    first = [_ranked(1, 0.2, False), _ranked(2, 0.4, False)]
    calls = []
    outcome = run_gate(first, lambda seeds: calls.append(seeds) or [], lambda c: [], want=1, budget=0, rounds=3)
    assert calls == [] and outcome.results[0].candidate.seed == 2 and not outcome.passed
    outcome = run_gate(first, lambda seeds: calls.append(seeds) or [], lambda c: [], want=1, budget=5, rounds=3)
    assert calls == [[3]] and outcome.rounds == 0  # the generator gave nothing: stop, do not spin


def test_contact_sheet(tmp_path):
    from PIL import Image

    results = [_ranked(1, 0.8, True), _ranked(2, 0.3, False), _ranked(3, 0.1, False)]
    path = write_results_sheet(tmp_path / "contact_sheet.png", results, thumb=64, columns=2)
    with Image.open(path) as im:
        sheet = np.asarray(im.convert("RGB"))
    assert sheet.shape[1] == 2 * (64 + 8) + 8 and sheet.shape[0] == 2 * (64 + 44 + 8) + 8
    assert (sheet == [60, 190, 90]).all(-1).any() and (sheet == [220, 70, 60]).all(-1).any()
    with pytest.raises(BadInput, match="no candidates"):
        write_results_sheet(tmp_path / "empty.png", [])


def test_switches_layering():
    switches = FinishSwitches.from_options({"fuse": True, "upscale": True}, {"upscale": False}, {"fuse": None, "restore": True})
    assert (switches.fuse, switches.upscale, switches.restore) == (True, False, True)
    with pytest.raises(BadInput, match="finish switch 'sharpen'"):
        FinishSwitches.from_options({"sharpen": True})


def test_a_faceless_output_has_no_similarity_and_ranks_last():
    """A faceless output used to score 0.0 and rank and average as if measured."""
    from portrait.core.formats.results import results_row
    from portrait.stages.score import ScorePolicy, passes, rank, score_faces

    faceless = score_faces([], (64, 64, 3), np.ones(4, np.float32), None, "dlib")
    assert faceless.similarity is None and faceless.reference_similarity is None and faceless.faces == 0
    measured = CandidateScore(similarity=-0.2, reference_similarity=-0.2, faces=1, face_size=0.2)
    request = GenerationRequest(identity=None, backend="lora", template=None, prompt="p", negative_prompt="",
                                width=8, height=8, steps=1, guidance=1.0, scheduler="euler", seed=0, n=2)
    cands = [Candidate(np.zeros((8, 8, 3), np.uint8), seed, request) for seed in (0, 1)]
    policy = ScorePolicy()
    ranked = rank(cands, [faceless, measured], policy, threshold=0.5)
    assert [r.candidate.seed for r in ranked] == [1, 0]  # a poor likeness still ranks above no face
    assert not passes(faceless, policy, 0.0)
    assert results_row(ranked[1])["similarity"] is None
