"""The commercial path (issue 29): under `--license commercial` the Apache-2.0 frontier backends
(klein-ref, qwen-edit, zimage) run on their stand-ins with the commercial face stack, every other
frontier identity backend is refused in one line naming klein-ref and qwen-edit, and `portrait
doctor` says which path is available."""

from __future__ import annotations

import json

import pytest

from portrait.cli.main import run as cli_run
from portrait.core.config import Settings
from portrait.core.licenses import LicenseRefused


@pytest.fixture(scope="module")
def home(tmp_path_factory, tiny_home, hopper, astronaut):
    """A home of its own with a zero-shot identity, sharing the session's tiny models."""
    from portrait.core.bundle import write_bundle

    root = tmp_path_factory.mktemp("commercial")
    (root / "models").symlink_to(tiny_home.models_dir, target_is_directory=True)
    settings = Settings(home=root, preset="tiny-flux2-klein", device="cpu", license="commercial")
    write_bundle(settings.identities_dir / "ana", {"name": "ana", "trigger": "sks", "class_word": "woman"},
                 reference=astronaut, photos=[astronaut, hopper])
    return settings


@pytest.mark.parametrize("preset,backend", [("tiny-flux2-klein", "klein-ref"), ("tiny-qwen-edit", "qwen-edit"),
                                            ("tiny-zimage", "zimage")])
def test_the_frontier_backends_run_under_the_commercial_policy(home, tmp_path, capsys, preset, backend):
    out = tmp_path / "out"
    rc = cli_run(["--home", str(home.home), "--license", "commercial", "--preset", preset, "generate",
                  "--identity", "ana", "--backend", backend, "--n", "1", "--seed", "3", "--out", str(out),
                  "--option", "references=1"] if backend != "zimage" else
                 ["--home", str(home.home), "--license", "commercial", "--preset", preset, "generate",
                  "--identity", "ana", "--backend", backend, "--n", "1", "--seed", "3", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    doc = json.loads((out / "results.json").read_text())
    assert doc["backend"] == backend and doc["license_policy"] == "commercial"
    assert {row["license_class"] for row in doc["bom"]} == {"commercial"}
    assert not any(row["id"].startswith(("tiny-antelopev2", "tiny-buffalo_l")) for row in doc["bom"])
    # pictures, not an embedding, condition these backends: every space scored is independent, and
    # none is an insightface pack's (their weights are refused under the policy)
    assert doc["scoring"]["conditioning_space"] is None
    assert set(doc["scoring"]["spaces"].values()) == {"independent"}
    assert not any(space.startswith("insightface:") for space in doc["scoring"]["spaces"])
    assert (out / doc["results"][0]["path"]).is_file()


@pytest.mark.parametrize("preset,backend", [("tiny-flux", "flux"), ("tiny-flux", "infiniteyou"),
                                            ("tiny-flux", "pulid-flux"), ("tiny-sdxl", "instantid"),
                                            ("tiny-sdxl", "pulid"), ("tiny-sdxl", "photomaker"), ("tiny", "faceid")])
def test_every_other_frontier_backend_is_refused_naming_klein_ref_and_qwen_edit(home, tmp_path, preset, backend):
    from portrait.flows.generate import generate

    settings = home.with_(preset=preset)
    out = tmp_path / "out"
    with pytest.raises(LicenseRefused) as caught:
        generate("ana", backend=backend, prompt="a photo of sks woman", n=1, out=out, settings=settings)
    message = str(caught.value)
    assert "\n" not in message and caught.value.exit_code == 3
    assert "--backend klein-ref" in message and "--backend qwen-edit" in message, message
    assert not out.exists()


def test_doctor_lists_the_commercial_path_as_available(home, capsys):
    rc = cli_run(["--home", str(home.home), "--license", "commercial", "doctor", "--json"])
    assert rc == 0
    rows = {(r["backend"], r["preset"]): r for r in json.loads(capsys.readouterr().out)["backends"]}
    for key in (("klein-ref", "tiny-flux2-klein"), ("qwen-edit", "tiny-qwen-edit"), ("zimage", "tiny-zimage")):
        assert rows[key]["status"] == "available", rows[key]
    for key in (("klein-ref", "klein-4b"), ("qwen-edit", "qwen-edit"), ("zimage", "zimage")):
        assert rows[key]["status"] == "allowed" and "portrait models download" in rows[key]["detail"]
    for key in (("infiniteyou", "flux"), ("instantid", "sdxl"), ("faceid", "tiny")):
        assert rows[key]["status"] == "refused" and "klein-ref" in rows[key]["detail"]


def test_the_demo_commercial_step_says_what_tiny_models_can_and_cannot_show(tiny_home, tmp_path, monkeypatch):
    """`portrait demo`'s commercial step alone (the other steps are the demo's own tests): it runs
    klein-ref under --license commercial, edits the best result, and says honestly that the
    stand-ins prove the path, not the likeness."""
    from portrait import demo

    step = next(s for s in demo.DEMO_STEPS if s.license == "commercial")
    monkeypatch.setattr(demo, "DEMO_STEPS", (step,))
    root = tmp_path / "home"
    root.mkdir()
    (root / "models").symlink_to(tiny_home.models_dir, target_is_directory=True)
    lines = list(demo.run_demo(Settings(home=root, preset="tiny", device="cpu"), tmp_path / "demo"))
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    (row,) = summary["steps"]
    assert row["backend"] == "klein-ref" and row["preset"] == "tiny-flux2-klein"
    assert any(name.startswith("edit/") for name in row["images"]) and len(row["images"]) == 2
    note = row["note"]
    assert "--license commercial" in note and "license class commercial" in note
    assert "cannot show: whether klein keeps a face" in note and "--preset klein-4b" in note
    doc = json.loads((tmp_path / "demo" / row["folder"] / "results.json").read_text())
    assert doc["license_policy"] == "commercial" and {r["license_class"] for r in doc["bom"]} == {"commercial"}
    assert any("commercial path" in line for line in lines)
