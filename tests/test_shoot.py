"""The shoot as customers buy it (issue 30): studio packages (backdrops x outfits x poses),
`--keep K` (a promised number of portraits that pass every check, with a keep report), face
restoration reachable, and the results history, from the CLI, the Python API and batch specs.

Tiny models draw noise (no face, so nothing could be kept); the keep loop is shown on
tests/face_backend.py, a backend that paints the identity's own face with some deliberately
bad seeds, and on real photos scored by dlib. The tiny LoRA pipeline runs the shoot for real
where the images need no face."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

import face_backend
from hostile_helpers import cli, error_line
from portrait.core.config import Settings
from portrait.core.errors import BadInput
from portrait.core.types import CandidateScore, FaceScore
from portrait.stages import shoots
from portrait.stages import score as sc
from portrait.stages.backends import register, unregister

CARD = {"size": "256x320"}  # big enough for dlib to find the painted face


@pytest.fixture(scope="module")
def facecard():
    register(face_backend.SPEC, replace=True)
    yield face_backend.SPEC
    unregister("facecard")


@pytest.fixture(scope="module")
def home(tiny_home, tmp_path_factory) -> Settings:
    """A home sharing the tiny models, with `ana` prepared (zero-shot) from the sample photos."""
    from portrait.flows.train import train
    from portrait.samples import write_sample_photos

    root = tmp_path_factory.mktemp("shoot-home")
    (root / "models").symlink_to(tiny_home.models_dir, target_is_directory=True)
    settings = Settings(home=root, preset="tiny", device="cpu")
    photos = write_sample_photos(root.parent / f"{root.name}-photos")
    train([str(p) for p in photos], "ana", zero_shot=True, settings=settings)
    return settings


@pytest.fixture(scope="module")
def warm(home):
    from portrait.core.context import RunContext

    return RunContext.create(home, preset="tiny")


# --- packages ---------------------------------------------------------------------------------------


def test_shipped_packages_and_their_cells():
    corporate = shoots.find_package("corporate")
    assert corporate.dimensions == ("backdrop", "outfit", "pose")
    assert len(shoots.all_cells(corporate)) == 4 * 3 * 2
    casual = shoots.find_package("casual")
    assert casual.dimensions == ("backdrop", "outfit") and len(shoots.all_cells(casual)) == 9
    two_by_two = shoots.select_cells(corporate, backdrops=["grey", "white"], outfits=["navy-suit", "blazer"],
                                     poses=["front"])
    assert [c.key for c in two_by_two] == ["grey/navy-suit/front", "grey/blazer/front", "white/navy-suit/front",
                                           "white/blazer/front"]
    # a key without its pose means every pose; a cell named twice is rendered once
    named = shoots.select_cells(corporate, ["grey/blazer", "grey/blazer/front"])
    assert [c.key for c in named] == ["grey/blazer/front", "grey/blazer/three-quarter"]
    cell = two_by_two[0]
    assert cell.folder == "grey_navy-suit_front" and cell.title == "Grey studio · Navy suit · Facing the camera"
    template = shoots.cell_template(cell)
    assert template.kind == "style" and template.name == "corporate"
    assert "navy suit" in template.prompt and "mid-grey" in template.prompt and "facing the camera" in template.prompt
    assert "{backdrop}" not in template.prompt and "{trigger}" in template.prompt
    business = shoots.base_template(corporate)
    assert (template.steps, template.scheduler, template.negative) == (business.steps, business.scheduler,
                                                                        business.negative)
    # no pose dimension: the slot leaves no stray comma
    assert ", ," not in shoots.cell_template(shoots.all_cells(casual)[0]).prompt


@pytest.mark.parametrize("choice, needle", [
    ({"backdrops": ["moon"]}, "--backdrops 'moon': package 'corporate' has no backdrop 'moon' (known: grey, white"),
    ({"cells": ["grey"]}, "--cells 'grey': a cell is backdrop/outfit/pose"),
    ({"cells": ["grey/tuxedo"]}, "has no outfit 'tuxedo'"),
    ({"cells": ["grey/blazer"], "outfits": ["blazer"]}, "not both"),
    ({"backdrops": []}, "--backdrops: name at least one backdrop"),
])
def test_a_wrong_cell_choice_is_one_line(choice, needle):
    with pytest.raises(BadInput) as err:
        shoots.select_cells(shoots.find_package("corporate"), choice.pop("cells", None), **choice)
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("change, needle", [
    ({"colour": "red"}, "colour"),
    ({"prompt": "photo of {trigger}, {hat}"}, "prompt slot {hat}"),
    ({"template": "hopper"}, "template: template 'hopper' is a photo template"),
    ({"outfits": [{"name": "Suit"}]}, "lowercase"),
    ({"outfits": [{"name": "suit"}, {"name": "suit"}]}, "outfit 'suit' is listed twice"),
    ({"backdrops": []}, "backdrops"),
    ({"poses": [{"name": "up", "controls": {"scribble": 1.0}}]}, "control 'scribble' is not one of"),
    ({"poses": [{"name": "up", "controls": {"openpose": {"image": "nope.jpg"}}}]}, "nope.jpg does not exist"),
])
def test_a_bad_package_file_is_one_line_naming_it(tmp_path, change, needle):
    import yaml

    data = {"name": "mine", "prompt": "photo of {trigger} {class}, {outfit}, {backdrop}",
            "backdrops": [{"name": "grey", "prompt": "grey backdrop"}], "outfits": [{"name": "suit"}], **change}
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(BadInput) as err:
        shoots.find_package(str(path))
    assert str(path) in str(err.value) and needle in str(err.value) and "\n" not in str(err.value)


def test_a_users_package_file_with_a_pose_image(tmp_path):
    import shutil

    from portrait.core.config import templates_root

    shutil.copy(Path(str(templates_root())) / "styles" / "poses" / "astronaut.jpg", tmp_path / "pose.jpg")
    (tmp_path / "mine.yaml").write_text(
        "prompt: 'photo of {trigger} {class}, {outfit}, {pose}, {backdrop}'\n"
        "backdrops: [{name: grey, prompt: grey backdrop}]\noutfits: [{name: suit, prompt: in a suit}]\n"
        "poses: [{name: astro, prompt: three-quarter, controls: {openpose: {image: pose.jpg, strength: 0.6}}}]\n")
    package = shoots.find_package(str(tmp_path / "mine.yaml"))
    assert package.name == "mine"
    (cell,) = shoots.all_cells(package)
    control = shoots.cell_template(cell).controls_by_name["openpose"]
    assert control.image == tmp_path / "pose.jpg" and control.strength == 0.6


# --- the keep checks ---------------------------------------------------------------------------------


def _score(**values) -> CandidateScore:
    base = dict(similarity=0.9, reference_similarity=0.9, faces=1, face_size=0.2, space="dlib",
                quality={"sharpness": 0.7, "exposure": 0.9})
    return CandidateScore(**{**base, **values})


def test_keep_reasons_name_every_failed_check():
    policy = sc.ScorePolicy()
    assert sc.keep_reasons(_score(), policy, 0.5) == []
    assert sc.keep_reasons(_score(faces=0, similarity=None), policy, 0.5) == ["no_face"]
    assert sc.keep_reasons(_score(faces=3), policy, 0.5) == ["extra_faces"]
    assert sc.keep_reasons(_score(face_size=0.001), policy, 0.5) == ["face_too_small"]
    assert sc.keep_reasons(_score(similarity=0.2), policy, 0.5) == ["below_gate"]
    assert sc.keep_reasons(_score(copy_paste="reproduces 000.jpg"), policy, 0.5) == ["copy_paste"]
    assert sc.keep_reasons(_score(quality={"sharpness": 0.05, "exposure": 0.1}), policy, 0.5) == ["blurry",
                                                                                                 "bad_exposure"]
    # ranked in the conditioning space: the independent space's similarity decides
    spaces = {"insightface:antelopev2": {"role": "conditioning", "similarity": 0.9},
              "dlib": {"role": "independent", "similarity": 0.3}}
    conditioned = _score(space="insightface:antelopev2", spaces=spaces)
    assert sc.keep_reasons(conditioned, policy, 0.5) == []
    assert sc.keep_reasons(conditioned, policy, 0.5, space="dlib") == ["below_gate"]
    group = _score(per_face=(FaceScore("a", 0, (0, 0, 9, 9), 0.9, 0.9, 0.1, True),
                             FaceScore("b", 1, None, 0.0, 0.0, 0.0, False)))
    assert sc.keep_reasons(group, policy, 0.5) == ["no_face"]
    assert set(sc.KEEP_REASONS) == {"no_face", "extra_faces", "face_too_small", "face_too_large", "below_gate",
                                    "copy_paste", "blurry", "bad_exposure"}


def _small(image: np.ndarray, side: int = 256) -> np.ndarray:
    from PIL import Image

    h, w = image.shape[:2]
    scale = side / max(h, w)
    return np.asarray(Image.fromarray(image).resize((round(w * scale), round(h * scale)), Image.LANCZOS))


def test_keep_gate_generates_until_enough_pass_and_reports_the_rest(finish_ctx, astronaut, hopper, t1_group,
                                                                    tmp_path):
    """Real photos scored by dlib: a new framing of the astronaut is kept; Hopper is someone
    else, a grey card has no face, a blurred astronaut is blurry, a group photo has extra
    faces, and the reference photo itself is a copy."""
    from PIL import Image, ImageFilter

    from portrait.core.io import write_image
    from portrait.core.types import Candidate, GenerationRequest, Identity
    from portrait.flows.finish import FinishSwitches, keep_gate

    write_image(tmp_path / "reference.png", astronaut)
    who = Identity(name="astro", root=tmp_path, trigger="sks", class_word="woman", reference=tmp_path / "reference.png",
                   photos=(), consensus={}, loras={}, manifest={})
    me = _small(astronaut[30:430, 60:460], 320)  # framed anew: not a copy of the reference
    pictures = {0: _small(hopper), 1: np.full((200, 200, 3), 128, np.uint8), 2: me,
                3: np.asarray(Image.fromarray(me).filter(ImageFilter.GaussianBlur(2.5))), 4: t1_group,
                5: _small(astronaut)}

    def candidate(seed: int) -> Candidate:
        image = pictures[seed % 6]
        request = GenerationRequest(identity=who, backend="faceid", template=None, prompt="a photo of sks woman",
                                    negative_prompt="", width=image.shape[1], height=image.shape[0], steps=4,
                                    guidance=5.0, scheduler="euler", seed=seed, n=1)
        return Candidate(image=image, seed=seed, request=request)

    asked: list[list[int]] = []

    def more(seeds):
        asked.append(list(seeds))
        return [candidate(s) for s in seeds]

    switches = FinishSwitches(fuse=False, retouch=False, upscale=False, restore=False, score=True, clip=False)
    outcome = keep_gate(finish_ctx, who, [candidate(0), candidate(1)], switches, more, keep=2)
    report = outcome.report
    assert [r.candidate.seed for r in outcome.results] == [2, 8] and [r.rank for r in outcome.results] == [1, 2]
    assert report["complete"] and report["kept"] == 2 and report["wanted"] == 2 and report["budget"] == 10
    # nothing kept from the first 2: ask 4 per missing one, within the budget of 2 x 5
    assert asked == [[2, 3, 4, 5, 6, 7, 8, 9]]
    assert report["tried"] == 10 and report["surplus"] == 0
    dropped = {row["seed"]: row["reasons"] for row in report["dropped"]}
    assert dropped[0] == dropped[6] == ["below_gate"] and dropped[1] == dropped[7] == ["no_face"]
    assert "blurry" in dropped[3] and dropped[3] == dropped[9] and dropped[5] == ["copy_paste"]
    assert dropped[4][0] == "extra_faces"
    assert report["checks"]["space"] == "dlib" and report["checks"]["threshold"] == 0.5
    assert report["summary"].startswith("kept 2 of 2 (tried 10); dropped: ")
    assert "did not look enough like the person (" in report["summary"]

    asked.clear()
    short = keep_gate(finish_ctx, who, [candidate(0)], switches, lambda seeds: [candidate(0) for _ in seeds], keep=1,
                      attempts=3)
    assert short.results == [] and not short.report["complete"] and short.report["tried"] == 3
    assert short.report["reasons"] == {"below_gate": 3}
    assert short.report["summary"] == ("kept 0 of 1 (tried 3, all the budget allows); dropped: did not look "
                                       "enough like the person (3)")
    with pytest.raises(BadInput, match=r"--attempts 1: from --keep \(2\) to 200"):
        keep_gate(finish_ctx, who, [candidate(2)], switches, more, keep=2, attempts=1)
    with pytest.raises(BadInput, match="--keep needs scoring"):
        keep_gate(finish_ctx, who, [candidate(2)], FinishSwitches(score=False), more, keep=1)


# --- the Python API ------------------------------------------------------------------------------------


def test_generate_keep_writes_only_kept_portraits_and_the_keep_report(home, warm, facecard, tmp_path):
    import portrait

    result = portrait.generate("ana", prompt="photo of {trigger} {class}, grey backdrop", backend="facecard",
                               keep=3, seed=3, out=tmp_path / "out", ctx=warm, width=256, height=320,
                               finish={"upscale": False, "fuse": False, "restore": True})
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    keep = data["keep"]
    assert keep["kept"] == 3 and keep["complete"]
    # seed 4 paints no face and seed 5 a blurred one (tests/face_backend.py): dropped, with reasons
    dropped = {row["seed"]: row["reasons"] for row in keep["dropped"]}
    assert dropped[4] == ["no_face"] and "blurry" in dropped[5], keep["dropped"]
    # the first round kept 1 of 3, so the second asked for 2 x 3 = 6 more: 5 kept in all, the
    # best 3 written (the other 2 are the surplus)
    assert keep["tried"] == 9 and keep["surplus"] == 2 and len(data["results"]) == 3
    seeds = sorted(r["seed"] for r in data["results"])
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == sorted(
        [r["path"] for r in data["results"]] + ["contact_sheet.png"])
    assert all(r["face_quality"]["sharpness"] >= 0.15 for r in data["results"])
    # restoration was asked for: the tiny preset has no restorer, and one line says so
    assert data["warnings"] == ["face restoration was asked for and skipped: model 'gfpgan-v1.4' has no tiny "
                                "stand-in; use a real preset"]
    assert result.info["warnings"] == data["warnings"]
    # the history has the run, under its job id, with the keep report
    history = portrait.History(home)
    rows = history.page("ana", job=data["run"]).rows
    assert sorted(r.seed for r in rows) == seeds and all(r.backend == "facecard" for r in rows)
    assert history.runs("ana", job=data["run"])[0]["keep"]["kept"] == 3
    with pytest.raises(BadInput, match="--n and --keep: give one"):
        portrait.generate("ana", prompt="x", backend="facecard", keep=2, n=2, out=tmp_path / "x", ctx=warm)


def test_shoot_renders_every_chosen_cell_grouped_by_cell(home, warm, facecard, tmp_path):
    import portrait

    result = portrait.shoot("ana", "corporate", backdrops=["grey", "white"], outfits=["navy-suit", "blazer"],
                            poses=["front"], keep=2, backend="facecard", seed=1, out=tmp_path / "shoot", ctx=warm,
                            width=256, height=320, finish={"upscale": False})
    out = tmp_path / "shoot"
    document = json.loads((out / "shoot.json").read_text())
    assert document["package"] == "corporate" and document["job"] == result.job and document["seed"] == 1
    assert [c["key"] for c in document["cells"]] == ["grey/navy-suit/front", "grey/blazer/front",
                                                     "white/navy-suit/front", "white/blazer/front"]
    for cell in document["cells"]:
        assert cell["keep"]["kept"] == 2 and len(cell["results"]) == 2
        for row in cell["results"]:
            assert row["path"].startswith(cell["folder"] + "/") and (out / row["path"]).is_file()
        cell_results = json.loads((out / cell["folder"] / "results.json").read_text())
        assert cell_results["cell"]["key"] == cell["key"] and cell_results["keep"]["kept"] == 2
        assert cell["title"] in cell_results["request"]["prompt"] or "navy suit" in cell_results["request"]["prompt"] \
            or "blazer" in cell_results["request"]["prompt"]
    assert (out / "contact_sheet.png").is_file() and result.complete and len(result.paths) == 8
    # backdrops differ per cell (the test backend paints the prompt's backdrop colour)
    from portrait.core.formats.images import read_rgb

    grey, white = read_rgb(result.cells[0].result.paths[0]), read_rgb(result.cells[2].result.paths[0])
    assert white[2, 2].mean() > grey[2, 2].mean() + 60
    rows = portrait.History(home).page("ana", job=result.job, per_page=100).rows
    assert len(rows) == 8 and {r.cell for r in rows} == {c["key"] for c in document["cells"]}
    assert all(r.template == "corporate" and r.present for r in rows)


def test_shoot_on_the_real_tiny_pipeline(home, warm, tmp_path):
    """The default backend on the tiny preset: every cell is a real LoRA-pipeline render."""
    from _generate_helpers import write_tiny_identity
    from portrait.core.formats.images import read_rgb
    from portrait.flows.shoot import shoot

    write_tiny_identity(home, "lora-ann", read_rgb(home.identities_dir / "ana" / "reference.png"), seed=3)
    result = shoot("lora-ann", "casual", cells=["park/sweater", "beach/linen"], n=1, seed=2, out=tmp_path / "s",
                   ctx=warm, finish=False, steps=2)
    assert [c.cell.key for c in result.cells] == ["park/sweater", "beach/linen"]
    assert all(c.result.backend == "lora" and len(c.result.paths) == 1 for c in result.cells)
    prompts = [c.result.request.prompt for c in result.cells]
    assert "green park" in prompts[0] and "knit sweater" in prompts[0] and "sunny beach" in prompts[1]


# --- the CLI -----------------------------------------------------------------------------------------------


def test_cli_shoot_and_generate_keep(home, facecard, tmp_path, capsys):
    code, out, err = cli(capsys, home.home, "shoot", "-i", "ana", "--package", "corporate", "--cells",
                         "grey/navy-suit/front,white/blazer/front", "--keep", "1", "-b", "facecard", "--seed", "6",
                         "--size", "256x320", "--no-upscale", "--restore", "--out", str(tmp_path / "shoot"))
    assert code == 0, err
    assert "grey/navy-suit/front  (Grey studio · Navy suit · Facing the camera)" in out
    assert out.count("kept 1 of 1 (tried 1)") == 2 and "shoot r" in out and "2 cell(s), 2 image(s)" in out
    # the missing restorer is one line, once per shoot, not only inside results.json
    assert err.count("warning: face restoration was asked for and skipped: model 'gfpgan-v1.4'") == 1
    code, out, err = cli(capsys, home.home, "generate", "-i", "ana", "-b", "facecard", "--prompt", "photo of {trigger}",
                         "--keep", "2", "--seed", "4", "--size", "256x320", "--no-upscale", "--out",
                         str(tmp_path / "gen"))
    assert code == 0, err
    assert "kept 2 of 2 (tried 4); dropped: no face in the picture (1)" in out  # seed 5's blur is fused away
    keep = json.loads((tmp_path / "gen" / "results.json").read_text())["keep"]
    assert keep["dropped"] == [{"seed": 4, "reasons": ["no_face"], "similarity": None}]  # no face: no similarity
    code, out, _ = cli(capsys, home.home, "packages")
    assert code == 0 and "corporate" in out and "casual" in out


@pytest.mark.parametrize("args, needles", [
    (["--package", "corporate", "--cells", "grey/tuxedo/front"], ["--cells 'grey/tuxedo/front'", "no outfit"]),
    (["--package", "nope"], ["unknown package 'nope'", "corporate"]),
    (["--package", "corporate", "--keep", "2", "--n", "2"], ["--n and --keep"]),
    (["--package", "corporate", "--keep", "2", "--attempts", "1"], ["--attempts 1"]),
    (["--package", "corporate", "-b", "template"], ["--backend template paints into photo templates"]),
])
def test_cli_shoot_refuses_bad_input_in_one_line(home, tmp_path, capsys, args, needles):
    code, _, err = cli(capsys, home.home, "shoot", "-i", "ana", "--out", str(tmp_path / "o"), *args)
    assert code == 2
    error_line(err, *needles)
    assert not (tmp_path / "o").exists()


def test_cli_results_list_star_zip_delete(home, facecard, tmp_path, capsys):
    code, _, err = cli(capsys, home.home, "generate", "-i", "ana", "-b", "facecard", "--prompt", "photo of {trigger}",
                       "--n", "2", "--seed", "1", "--size", "256x320", "--no-upscale", "--out", str(tmp_path / "gen"))
    assert code == 0, err
    run = json.loads((tmp_path / "gen" / "results.json").read_text())["run"]
    code, out, _ = cli(capsys, home.home, "results", "list", "ana", "--job", run, "--json")
    listing = json.loads(out)
    assert code == 0 and listing["total"] == 2
    ids = [r["id"] for r in listing["results"]]
    code, out, _ = cli(capsys, home.home, "results", "star", "ana", ids[0])
    assert code == 0 and "starred 1 result(s)" in out
    code, out, _ = cli(capsys, home.home, "results", "list", "ana", "--starred", "--json")
    assert [r["id"] for r in json.loads(out)["results"]] == [ids[0]]
    code, out, _ = cli(capsys, home.home, "results", "zip", "ana", *ids, "--out", str(tmp_path / "pick.zip"))
    names = zipfile.ZipFile(tmp_path / "pick.zip").namelist()
    assert code == 0 and len([n for n in names if n.endswith(".png")]) == 2 and "results.json" in names
    code, _, err = cli(capsys, home.home, "results", "star", "ana", "no-such-id")
    assert code == 2 and "result 'no-such-id' not found" in error_line(err)
    code, out, _ = cli(capsys, home.home, "results", "delete", "ana", ids[1])
    assert code == 0 and "1 file(s) removed" in out
    left = json.loads((tmp_path / "gen" / "results.json").read_text())["results"]
    assert len(left) == 1 and (tmp_path / "gen" / left[0]["path"]).is_file()


# --- the history -----------------------------------------------------------------------------------------


def test_history_is_per_identity_and_pages(tmp_path):
    from portrait.core.io import write_image
    from portrait.flows.history import History, UnknownResult

    history = History(tmp_path)
    folder = tmp_path / "run"
    for i in range(5):
        write_image(folder / f"{i}.png", np.full((8, 8, 3), i * 40, np.uint8))
    rows = [{"path": f"{i}.png", "seed": i, "rank": i + 1, "similarity": 0.9 - i / 10, "passed_gate": True,
             "similarity_space": "dlib", "scores": {"dlib": {"similarity": 0.9}}} for i in range(5)]
    ids = history.record(identity="ana", job="j1", folder=folder, rows=rows[:3], backend="lora", template="film")
    other = history.record(identity="bob", job="j2", folder=folder, rows=rows[3:], backend="lora", template="film")
    page = history.page("ana", per_page=2)
    assert page.total == 3 and [r.seed for r in page.rows] == [0, 1] and page.as_dict()["pages"] == 2
    assert "path" not in json.dumps(page.as_dict()) and "/" not in json.dumps(page.as_dict()["results"][0]["id"])
    with pytest.raises(UnknownResult):  # bob's result is not ana's
        history.star("ana", [other[0]])
    with pytest.raises(UnknownResult):
        history.zip("ana", [ids[0], other[0]])
    assert history.star("ana", ids[:2]) == 2 and history.page("ana", starred=True).total == 2
    # a rerun into the same folder keeps ids and stars; a file the run no longer holds goes
    again = history.record(identity="ana", job="j3", folder=folder, rows=rows[:2], backend="lora", template="film",
                           whole_folder=True)
    assert again == ids[:2] and history.page("ana").total == 2 and history.page("ana", starred=True).total == 2
    with zipfile.ZipFile(io.BytesIO(history.zip("ana", again))) as zf:
        assert json.loads(zf.read("results.json"))["identity"] == "ana" and len(zf.namelist()) == 3
    receipt = history.delete("ana", [again[0]])
    assert receipt["files_removed"] == 1 and not (folder / "0.png").exists() and history.page("ana").total == 1
    assert history.forget("bob") == 0  # bob's rows went with the whole-folder rerun of ana's folder
    with pytest.raises(BadInput, match="per_page 500: use 1-100"):
        history.page("ana", per_page=500)


# --- batch specs -----------------------------------------------------------------------------------------


def test_batch_spec_with_a_shoot_and_keep(home, facecard, tmp_path):
    from portrait.studio.api import Studio
    from portrait.studio.executor import FlowExecutor
    from portrait.studio.runner import StudioPolicy
    from portrait.studio.spec import parse_spec

    spec = {"output": str(tmp_path / "out"), "identities": ["ana"], "backends": ["facecard"], "seed": 3,
            "shoot": {"package": "corporate", "backdrops": ["grey", "white"], "outfits": ["navy-suit"],
                      "poses": "front"},
            "keep": 2, "size": [256, 320], "finish": {"upscale": False}}
    parsed = parse_spec(spec)
    executor = FlowExecutor(home)
    studio = Studio(tmp_path / "store.db", settings=home, policy=StudioPolicy(), executor_factory=lambda: executor)
    job = studio.expand(parsed)
    generates = [i for i in job.items if i.kind == "generate"]
    assert len(generates) == 2 and all(i.payload["keep"] == 2 and i.payload["run"] == job.id for i in generates)
    assert [i.payload["shoot"]["cell"] for i in generates] == ["grey/navy-suit/front", "white/navy-suit/front"]
    summary = studio.run(parsed)
    assert summary.ok, [r.error for r in summary.status.failed()]
    cell = tmp_path / "out" / "ana" / "corporate" / "grey_navy-suit_front"
    assert sorted(p.name for p in cell.iterdir()) == ["facecard-s3-keep2-0.png", "facecard-s3-keep2-1.png",
                                                      "facecard-s3-keep2.results.json"]
    report = json.loads((cell / "facecard-s3-keep2.results.json").read_text())
    assert report["keep"]["kept"] == 2 and report["keep"]["dropped"][0]["reasons"] == ["no_face"]
    assert [r["path"] for r in report["results"]] == ["facecard-s3-keep2-0.png", "facecard-s3-keep2-1.png"]
    rows = __import__("portrait").History(home).page("ana", job=job.id).rows
    assert len(rows) == 4 and {r.cell for r in rows} == {"grey/navy-suit/front", "white/navy-suit/front"}
    # the same spec again adds nothing
    assert studio.submit(parsed).added == 0


def test_batch_keep_that_keeps_nothing_fails_once_with_the_reason(home, tmp_path):
    """The tiny LoRA pipeline draws noise: no face, nothing kept; the item fails permanently
    (retrying the same seeds cannot help) with the keep summary as its reason."""
    from _generate_helpers import write_tiny_identity
    from portrait.core.formats.images import read_rgb
    from portrait.studio.api import Studio
    from portrait.studio.runner import StudioPolicy

    write_tiny_identity(home, "lora-bea", read_rgb(home.identities_dir / "ana" / "reference.png"), seed=4)
    studio = Studio(tmp_path / "store.db", settings=home, policy=StudioPolicy())
    summary = studio.run({"output": str(tmp_path / "out"), "identities": ["lora-bea"], "prompts": ["photo of {trigger}"],
                          "keep": 1, "attempts": 2, "steps": 2, "finish": {"upscale": False}})
    (row,) = summary.status.failed()
    assert row.attempts == 1 and row.error_kind == "not_kept"
    assert row.error.endswith("kept 0 of 1 (tried 2, all the budget allows); dropped: no face in the picture (2)")


@pytest.mark.parametrize("change, needle", [
    ({"keep": 2, "count": 3}, "`count` and `keep`: give one"),
    ({"attempts": 3}, "`attempts` bounds `keep`"),
    ({"keep": 3, "attempts": 2}, "attempts 2: at least keep (3)"),
    ({"shoot": {"package": "corporate", "colours": ["red"]}}, "colours"),
    ({"keep": 1, "finish": False}, "`keep` needs scoring"),
])
def test_bad_keep_or_shoot_in_a_spec_is_one_line(change, needle):
    from portrait.studio.spec import parse_spec

    with pytest.raises(BadInput) as err:
        parse_spec({"output": "out", "identities": ["ana"], "prompts": ["x"], **change})
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_a_shoot_naming_an_unknown_cell_fails_at_expansion_naming_the_spec(tmp_path):
    from portrait.studio.spec import expand, parse_spec

    spec = parse_spec({"output": "out", "identities": ["ana"], "shoot": {"package": "corporate", "cells": ["x/y"]}},
                      source="spec.yaml")
    with pytest.raises(BadInput, match=r"^spec\.yaml: shoot: --cells 'x/y'"):
        expand(spec, base_dir=tmp_path, default_preset="tiny", identity_exists=lambda name: True, source="spec.yaml")



def test_the_shoot_example_spec_expands():
    from portrait.studio.spec import expand, load_spec

    path = Path(__file__).resolve().parents[1] / "examples" / "shoot.yaml"
    job = expand(load_spec(path), base_dir=path.parent, default_preset="tiny", identity_exists=lambda name: True,
                 source=str(path))
    cells = [i.payload["shoot"]["cell"] for i in job.items]
    assert cells == ["grey/navy-suit/front", "grey/blazer/front", "white/navy-suit/front", "white/blazer/front"]
    assert all(i.payload["keep"] == 2 and i.payload["attempts"] == 10 for i in job.items)
