"""The tiny commercial stack end to end (prepare, train, generate with the lora and template
backends, finish) under `--license commercial`, its bill of materials, and `portrait eval`'s
report opened in a real browser (issue 18)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from portrait.cli.main import run as cli_run
from portrait.core.config import Settings

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def home(tmp_path_factory, tiny_home) -> Settings:
    """A commercial home whose user has also fetched AuraFace (`portrait models download auraface`):
    its one file sits where the download puts it, so AuraFace counts as a present independent
    space, as on a studio's machine (a tiny stand-in alone never does). The file is the tiny
    stand-in's bytes; the tiny preset still resolves the stand-in for its own analysis."""
    root = tmp_path_factory.mktemp("commercial-home")
    models = root / "models"
    models.mkdir()
    for entry in tiny_home.models_dir.iterdir():
        (models / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    (models / "auraface").mkdir()
    shutil.copyfile(tiny_home.models_dir / "tiny-auraface" / "glintr100.onnx", models / "auraface" / "glintr100.onnx")
    return Settings(home=root, preset="tiny", device="cpu", license="commercial")


@pytest.fixture(scope="module")
def runs(home, tmp_path_factory):
    """Train `biz` and generate with both LoRA-family backends, all under the commercial policy."""
    from portrait.core.context import RunContext
    from portrait.flows.generate import generate
    from portrait.samples import write_sample_photos

    work = tmp_path_factory.mktemp("commercial-runs")
    photos = work / "photos"
    write_sample_photos(photos, bad_file=False)
    rc = cli_run(["--home", str(home.home), "--preset", "tiny", "--license", "commercial", "train", str(photos),
                  "--name", "biz", "--steps", "4"])
    assert rc == 0
    rc = cli_run(["--home", str(home.home), "--preset", "tiny", "--license", "commercial", "generate", "-i", "biz",
                  "--n", "1", "--seed", "5", "--no-upscale", "--out", str(work / "lora")])
    assert rc == 0
    ctx = RunContext.create(home, preset="tiny")
    generate("biz", backend="template", n=1, seed=7, out=work / "template", ctx=ctx, finish={"upscale": False})
    return work


def _commercial_bom(rows):
    ids = {row["id"] for row in rows}
    assert all(row["license_class"] == "commercial" for row in rows), [(r["id"], r["license_class"]) for r in rows]
    assert {"tiny-auraface", "dlib-landmarks-5", "dlib-face-recognition", "dlib-hog-detector"} <= ids
    assert not ids & {"dlib-landmarks-68", "tiny-antelopev2", "tiny-buffalo_l", "tiny-inswapper", "tiny-clip",
                      "tiny-face-parser"}
    for row in rows:
        for f in row["files"]:
            assert f["sha256"] and len(f["sha256"]) == 64, (row["id"], f)
    return ids


def test_commercial_training_writes_a_bundle_with_its_bill_of_materials(home, runs):
    manifest = json.loads((home.identities_dir / "biz" / "manifest.json").read_text())
    assert manifest["face_backend"] == "auraface" and manifest["license_policy"] == "commercial"
    assert manifest["loras"]["sd15"]["file"] == "lora.safetensors"
    ids = _commercial_bom(manifest["bom"])
    assert "tiny-sd15" in ids
    assert {"auraface", "dlib"} <= set(manifest["self_similarity"])


@pytest.mark.parametrize("backend", ["lora", "template"])
def test_commercial_generation_scores_in_two_spaces_and_lists_its_models(runs, backend):
    report = json.loads((runs / backend / "results.json").read_text())
    assert report["backend"] == backend and report["license_policy"] == "commercial"
    ids = _commercial_bom(report["bom"])
    assert "tiny-sd15" in ids
    if backend == "template":
        assert "tiny-controlnet-sd15-canny" in ids
    scoring = report["scoring"]
    # the LoRA's checkpoints were picked by likeness in dlib (training validates in a space
    # independent of AuraFace, which chose the photos), so dlib shaped the output and AuraFace,
    # present, ranks it
    assert scoring["ranking_space"] == "auraface" and scoring["conditioning_space"] == "dlib"
    for row in report["results"]:
        # the contract's fields are kept; the spaces are added beside them
        assert {"path", "seed", "rank", "similarity", "passed_gate", "timings"} <= set(row)
        assert row["similarity_space"] == "auraface"
        assert row["scores"]["auraface"]["role"] == "independent" and row["scores"]["dlib"]["role"] == "conditioning"
        assert row["similarity"] == row["scores"]["auraface"]["similarity"]
        assert any("CLIP-T skipped" in note and "refused" in note for note in row["info"]["finish_notes"])


def _browser():
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{CHROMIUM} is missing: .ci/run installs it (apt-get install -y chromium)")
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    return sync_playwright()


def test_eval_writes_a_report_a_browser_shows_with_its_plots(home, runs, capsys):
    shutil.copyfile(home.identities_dir / "biz" / "photos" / "000.jpg", runs / "lora" / "dropped.jpg")
    out = runs / "report"
    rc = cli_run(["--home", str(home.home), "--preset", "tiny", "--license", "commercial", "eval",
                  str(runs / "lora"), str(runs / "template"), "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    data = json.loads((out / "eval.json").read_text())
    groups = {(g["backend"], g["template"]): g for g in data["groups"]}
    assert {("lora", "business"), ("template", "hopper"), ("lora", "unlisted files")} <= set(groups)
    assert set(data["spaces"]) == {"auraface", "dlib"}
    assert data["overall"]["copy_paste"] == 1 and data["overall"]["unlisted"] == 1
    dropped = next(r for r in data["rows"] if not r["listed"])
    assert dropped["copy_paste"] and dropped["image"].endswith("dropped.jpg")

    with _browser() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto((out / "index.html").as_uri())
        plots = page.locator("svg.plot")
        assert plots.count() == 3
        names = [plots.nth(i).get_attribute("data-plot") for i in range(3)]
        assert names == ["similarity", "clip-vs-similarity", "gate"]
        # similarity bars per space: (groups x spaces) bars, each drawn with a height
        bars = page.locator('svg[data-plot="similarity"] rect.bar')
        assert bars.count() >= 2
        series = {bars.nth(i).get_attribute("data-series") for i in range(bars.count())}
        assert series == {"auraface (independent)", "dlib (conditioning)"}
        box = plots.nth(0).bounding_box()
        assert box and box["width"] > 300 and box["height"] > 200
        # CLIP-T is refused under the policy: the scatter says so instead of plotting nothing silently
        assert "refused by the license policy" in plots.nth(1).text_content()
        images = page.locator(".gallery img")
        assert images.count() >= 2
        assert all(images.nth(i).evaluate("img => img.complete && img.naturalWidth > 0")
                   for i in range(images.count()))
        assert page.locator("figure.copy-paste").count() == 1
        assert "dropped.jpg" in page.locator("ul.flags").inner_text()
        browser.close()


def _write_run(folder: Path, preset: str, similarities: list) -> None:
    folder.mkdir(parents=True)
    rows = [{"path": f"{folder.name}_{k}.png", "seed": k, "rank": k + 1, "similarity": s, "similarity_space": "dlib",
             "scores": {"dlib": {"role": "independent", "similarity": s}}, "passed_gate": s is not None and s >= 0.5,
             "faces": 0 if s is None else 1, "copy_paste": None} for k, s in enumerate(similarities)]
    (folder / "results.json").write_text(json.dumps({"identity": "eve", "backend": "lora", "template": "business",
                                                     "preset": preset, "request": {}, "results": rows}))


def test_eval_groups_by_run_and_preset_and_shows_two_presets_side_by_side(tmp_path):
    """eval used to group by (backend, template) only: two presets or two runs merged into one."""
    from portrait.flows.evaluate import evaluate

    _write_run(tmp_path / "a", "sd15", [0.8, 0.6])
    _write_run(tmp_path / "b", "sdxl", [0.4, None])  # the second output shows no face
    _write_run(tmp_path / "c", "sd15", [0.7])  # a second run of the same preset is its own group
    report = evaluate([tmp_path / "a", tmp_path / "b", tmp_path / "c"], out=tmp_path / "eval", rescore=False)
    groups = {(Path(g["run"]).name, g["preset"]): g for g in report.data["groups"]}
    assert set(groups) == {("a", "sd15"), ("b", "sdxl"), ("c", "sd15")}
    b = groups[("b", "sdxl")]
    assert b["n"] == 2 and b["no_face"] == 1 and b["similarity"]["dlib"] == 0.4  # null is not averaged as 0
    assert groups[("a", "sd15")]["similarity"]["dlib"] == 0.7 and groups[("a", "sd15")]["no_face"] == 0
    assert report.data["overall"]["no_face"] == 1
    side = report.data["side_by_side"]
    assert side["presets"] == ["sd15", "sdxl"]
    (row,) = side["rows"]
    assert (row["backend"], row["template"]) == ("lora", "business")
    assert row["cells"]["sd15"]["n"] == 3 and row["cells"]["sdxl"]["n"] == 2
    assert row["cells"]["sd15"]["similarity"] == 0.7 and row["cells"]["sdxl"]["similarity"] == 0.4
    page = report.html.read_text()
    assert 'data-compare="presets"' in page and "<th>sd15</th>" in page and "<th>sdxl</th>" in page
    assert all(r["image"] is None or "b_1" not in r["image"] for r in report.data["best"])  # no face is not "best"
    assert "b_1" in report.data["worst"][0]["image"]  # ranked last: the first of the worst
