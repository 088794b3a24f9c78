"""The license policy (issue 18): classes per registry model, refusal at resolve time, the
commercial face stack (dlib 5-point + AuraFace) and the bill of materials in `doctor`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from portrait.cli.main import run as cli_run
from portrait.core.config import Settings, presets_root
from portrait.core.errors import BadInput, ModelMissing
from portrait.core.io import sha256_file
from portrait.core.licenses import LICENSE_CLASSES, LicenseRefused, effective
from portrait.core.registry import Registry


@pytest.fixture(scope="module")
def registry() -> Registry:
    return Registry.load()


def test_every_registry_model_has_a_license_class_and_its_source(registry):
    rows = yaml.safe_load((presets_root() / "licenses.yaml").read_text())["licenses"]
    assert set(rows) == set(registry.specs), "licenses.yaml and models.yaml must name the same ids"
    for spec in registry.specs.values():
        assert spec.license_class in LICENSE_CLASSES, spec.id
        assert spec.license_source.strip(), f"{spec.id}: no license source"
        if spec.license_class != "commercial":
            assert spec.alternative, f"{spec.id}: a refused model must name what to use instead"
    # the facts the issue names
    for model_id in ("antelopev2", "buffalo_l", "inswapper-128", "instantid-adapter", "ip-adapter-faceid-sd15",
                     "photomaker-v2", "dlib-landmarks-68"):
        assert registry.get(model_id).license_class in ("non-commercial", "research"), model_id
    for model_id in ("sd15", "sdxl", "photomaker-v1", "realesrgan-x4plus", "dlib-landmarks-5",
                     "dlib-face-recognition", "auraface"):
        assert registry.get(model_id).license_class == "commercial", model_id


@pytest.mark.parametrize("tiny", [False, True])
def test_commercial_policy_refuses_every_non_commercial_model_of_the_registry(registry, tmp_path, tiny):
    commercial = Settings(home=tmp_path, preset="tiny", device="cpu", license="commercial")
    anything = Settings(home=tmp_path, preset="tiny", device="cpu", license="any")
    refused = 0
    for spec in registry.specs.values():
        terms = effective(registry, spec)
        if terms.license_class != "commercial":
            with pytest.raises(LicenseRefused) as caught:
                registry.resolve(spec.id, commercial, tiny=tiny)
            message = str(caught.value)
            assert caught.value.exit_code == 3
            assert "\n" not in message
            assert f"'{terms.id}'" in message and terms.license in message and "--license commercial" in message
            assert f"use {terms.alternative} instead" in message
            refused += 1
        else:
            try:
                registry.resolve(spec.id, commercial, tiny=tiny)
            except LicenseRefused as exc:  # pragma: no cover - the assertion below names it
                pytest.fail(f"{spec.id} ({spec.license_class}) refused: {exc}")
            except (ModelMissing, BadInput):
                pass  # absent from this empty home: allowed, just not there
        try:
            registry.resolve(spec.id, anything, tiny=tiny)
        except LicenseRefused as exc:  # pragma: no cover
            pytest.fail(f"--license any refused {spec.id}: {exc}")
        except (ModelMissing, BadInput):
            pass
    assert refused >= 20


def test_a_stand_in_is_only_as_usable_as_what_it_stands_in_for(registry):
    assert effective(registry, registry.get("tiny-antelopev2")).id == "antelopev2"
    assert effective(registry, registry.get("tiny-inswapper")).id == "inswapper-128"
    # tiny-sdxl stands in for sdxl (commercial) and yamermix-v8 (unknown): usable as sdxl
    assert effective(registry, registry.get("tiny-sdxl")).id == "tiny-sdxl"
    assert effective(registry, registry.get("tiny-auraface")).id == "tiny-auraface"


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    return err


def test_cli_flag_and_environment_refuse_with_one_line_and_exit_3(tmp_path, capsys, monkeypatch):
    home = str(tmp_path / "home")
    assert cli_run(["--home", home, "--license", "commercial", "models", "path", "antelopev2"]) == 3
    line = _one_line(capsys)
    assert "antelopev2" in line and "non-commercial" in line and "use auraface instead" in line
    monkeypatch.setenv("PORTRAIT_LICENSE", "commercial")
    assert cli_run(["--home", home, "models", "path", "inswapper-128"]) == 3
    assert "inswapper-128" in _one_line(capsys)
    assert cli_run(["--home", home, "--license", "free-for-all", "doctor"]) == 2
    assert "--license 'free-for-all'" in _one_line(capsys)


def test_without_the_real_auraface_the_policy_names_the_command_that_fetches_it(tmp_path, capsys):
    from portrait.samples import write_sample_photos

    photos = tmp_path / "photos"
    write_sample_photos(photos, bad_file=False)
    out = tmp_path / "prepared"
    rc = cli_run(["--home", str(tmp_path / "home"), "--preset", "sd15", "--license", "commercial",
                  "prepare", str(photos), "--out", str(out)])
    assert rc == 3
    line = _one_line(capsys)
    assert "'auraface'" in line and "portrait models download auraface" in line
    assert not out.exists(), "refused before any work"


def test_a_preset_can_demand_the_policy(tiny_home):
    from portrait.core.context import RunContext

    assert tiny_home.license == "any"
    ctx = RunContext.create(tiny_home, preset="tiny-commercial")
    assert ctx.settings.license == "commercial" and ctx.preset.tiny
    with pytest.raises(LicenseRefused):
        ctx.resolve("antelopev2")
    assert RunContext.create(tiny_home, preset="commercial").settings.license == "commercial"


def test_generate_refuses_a_research_only_backend_before_any_work(tiny_home, tmp_path, astronaut):
    from portrait.core.bundle import write_manifest
    from portrait.core.io import write_image
    from portrait.flows.generate import generate

    settings = Settings(home=tmp_path / "home", preset="tiny-sdxl", device="cpu", license="commercial")
    root = settings.identities_dir / "astro"
    write_image(root / "reference.png", astronaut)
    write_manifest(root, {"name": "astro", "trigger": "sks", "class_word": "woman", "reference": "reference.png"})
    out = tmp_path / "out"
    with pytest.raises(LicenseRefused, match="instantid"):
        generate("astro", backend="instantid", prompt="a photo of sks woman", n=1, out=out, settings=settings)
    assert not out.exists()


def test_commercial_face_stack_is_dlib_5_point_and_auraface_through_insightface(tiny_home, astronaut):
    from portrait.core.faces import head_pose, make_analyzer

    settings = tiny_home.with_(license="commercial")
    registry = Registry.load()
    with registry.recording() as used:
        analyzer = make_analyzer(None, "auto", registry=registry, settings=settings, tiny=True)
    assert analyzer.backend == "auraface"
    assert type(analyzer._rec).__name__ == "ArcFaceONNX"  # routed by insightface.model_zoo, as real recognizers are
    assert set(used) == {"tiny-auraface", "dlib-landmarks-5", "dlib-face-recognition", "dlib-cnn-detector"}
    (face,) = analyzer.detect(astronaut)
    assert face.embedding.shape == (512,) and face.landmarks is None  # no 68-point model
    yaw, pitch, _ = head_pose(face.kps)
    assert abs(yaw) < 15 and abs(pitch) < 15, "the 5-point nose base is moved to the tip: a frontal face is frontal"
    # the same image scores as the same face; asking for the 68-point model is refused, not dropped
    assert analyzer.similarity(face.embedding, analyzer.detect(astronaut)[0].embedding) > 0.999
    with pytest.raises(LicenseRefused, match="dlib-landmarks-68"):
        make_analyzer(None, "dlib", registry=registry, settings=settings, landmarks68=True)


def test_doctor_prints_the_bill_of_materials_of_the_policy(tiny_home, capsys):
    rc = cli_run(["--home", str(tiny_home.home), "--preset", "tiny", "--license", "commercial", "doctor", "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    bom = report["bill_of_materials"]
    assert bom["license_policy"] == "commercial" and bom["face_backend"] == "auraface"
    rows = {row["role"]: row for row in bom["models"]}
    recognizer = rows["face_recognizer"]
    assert recognizer["id"] == "tiny-auraface" and recognizer["status"] == "present"
    (onnx,) = recognizer["files"]
    assert onnx["sha256"] == sha256_file(Path(recognizer["root"]) / "glintr100.onnx")
    assert rows["face_pack_instantid"]["status"] == "refused"
    assert rows["base"]["stands_for"] and "sd15" in rows["base"]["stands_for"]
    assert all(r["license_class"] == "commercial" for r in bom["models"] if r["status"] == "present")
    table = {row["id"]: row for row in report["models"]}
    assert table["antelopev2"]["present"] == "refused" and table["antelopev2"]["license_class"] == "non-commercial"


def test_download_is_refused_before_any_fetch_under_the_commercial_policy(tmp_path, capsys, monkeypatch):
    import portrait.core.registry as registry_module

    fetched: list[str] = []
    monkeypatch.setattr(registry_module, "download", lambda spec, settings: fetched.append(spec.id))
    home = str(tmp_path / "home")
    assert cli_run(["--home", home, "--license", "commercial", "models", "download", "antelopev2"]) == 3
    line = _one_line(capsys)
    assert "antelopev2" in line and "non-commercial" in line
    assert fetched == []
    # Under the default policy the same command reaches the fetch and says the license first.
    assert cli_run(["--home", home, "models", "download", "antelopev2"]) == 0
    assert fetched == ["antelopev2"]
    assert "antelopev2: license" in capsys.readouterr().err
