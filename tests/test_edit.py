"""`portrait edit` (issue 29): identity-locked edits of a result, re-scored and gated, with the
edit chain recorded in results.json and in every PNG."""

from __future__ import annotations

import hashlib
import json

import pytest
from PIL import Image

from portrait.cli.main import run as cli_run
from portrait.core.config import Settings
from portrait.core.errors import BadInput


@pytest.fixture(scope="module")
def home(tmp_path_factory, tiny_home, hopper, astronaut):
    from portrait.core.bundle import write_bundle

    root = tmp_path_factory.mktemp("edit")
    (root / "models").symlink_to(tiny_home.models_dir, target_is_directory=True)
    settings = Settings(home=root, preset="tiny-flux2-klein", device="cpu")
    write_bundle(settings.identities_dir / "ana", {"name": "ana", "trigger": "sks", "class_word": "woman"},
                 reference=astronaut, photos=[astronaut])
    return settings


@pytest.fixture(scope="module")
def result_png(home, tmp_path_factory):
    """One klein-ref result to edit."""
    import portrait

    out = tmp_path_factory.mktemp("gen") / "out"
    result = portrait.generate("ana", prompt="portrait photo of {trigger} {class}", backend="klein-ref", n=1, seed=3,
                               out=out, settings=home, steps=2, options={"references": 1})
    return result.paths[0]


def _chunk(path):
    with Image.open(path) as im:
        return json.loads(im.text["portrait"])


def test_edit_keeps_the_identity_records_the_chain_and_gates(home, result_png, tmp_path, astronaut):
    import portrait

    backdrop = tmp_path / "backdrop.png"
    Image.fromarray(astronaut[:200, :300]).save(backdrop)
    out = tmp_path / "edited"
    result = portrait.edit(result_png, prompt="a sunny beach behind her", references=[backdrop], n=1, seed=11,
                           out=out, settings=home, steps=2)
    assert result.identity == "ana" and result.backend == "klein-ref"  # from the result's own metadata
    doc = json.loads((out / "results.json").read_text())
    step = doc["request"]["options"]["edit"]
    assert step["source_sha256"] == hashlib.sha256(result_png.read_bytes()).hexdigest()
    assert step["prompt"] == "a sunny beach behind her" and step["backend"] == "klein-ref"
    assert step["references"][0]["sha256"] == hashlib.sha256(backdrop.read_bytes()).hexdigest()
    assert step["source_request"]["seed"] == 3 and len(step["chain"]) == 1
    row = doc["results"][0]
    assert row["path"].startswith("ana_edit_")
    roles = [r["role"] for r in row["info"]["references"]]
    assert roles == ["edit-source", "reference", "identity"]  # the result, the backdrop, then the identity's crop
    assert row["info"]["identity_mode"] == "edit"
    assert "Keep the face and identity of the person in image 1 (the same person as in image 3)" in \
        row["info"]["prompt_sent"]
    # re-scored against the identity; below the gate it asked for more seeds (tiny models draw noise)
    assert doc["scoring"]["spaces"] and row["scores"]
    assert doc["gate"]["evaluated"] > 1 and doc["gate"]["extra_seeds"]
    assert doc["finish"]["fuse"] is False  # an edit is not undone by pasting the reference face back
    png = _chunk(out / row["path"])
    assert png["request"]["options"]["edit"]["source_sha256"] == step["source_sha256"]
    # an edit of the edit extends the chain
    again = portrait.edit(out / row["path"], prompt="evening light", out=tmp_path / "again", settings=home, steps=2,
                          seed=1, finish={"fuse": False, "upscale": False})
    chain = json.loads((tmp_path / "again" / "results.json").read_text())["request"]["options"]["edit"]["chain"]
    assert [c["prompt"] for c in chain] == ["a sunny beach behind her", "evening light"]
    assert again.results[0].candidate.request.resolved.edit["source_request"]["backend"] == "klein-ref"


def test_cli_edit_says_what_it_kept(home, result_png, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = cli_run(["--home", str(home.home), "--preset", "tiny-flux2-klein", "edit", str(result_png), "--prompt",
                  "a red scarf", "--out", str(out), "--seed", "2", "--steps", "2", "--option", "identity_references=0"])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "kept 0 of 1 above the gate after" in printed and "regenerated" in printed
    doc = json.loads((out / "results.json").read_text())
    assert [r["role"] for r in doc["results"][0]["info"]["references"]] == ["edit-source"]


def test_qwen_edit_and_kontext_edit_too(home, result_png, tmp_path):
    import portrait

    qwen = portrait.edit(result_png, prompt="a blue jacket", out=tmp_path / "q", settings=home.with_(preset="tiny-qwen-edit"),
                         steps=2, seed=1, finish=False, options={"identity_references": 0, "true_cfg": 1.0})
    assert qwen.backend == "qwen-edit" and qwen.results[0].candidate.info["identity_mode"] == "edit"
    kontext = portrait.edit(result_png, prompt="a blue jacket", out=tmp_path / "k", settings=home.with_(preset="tiny-flux"),
                            steps=2, seed=1, finish=False)
    assert kontext.backend == "kontext" and kontext.results[0].candidate.image.std() > 1.0
    with pytest.raises(BadInput, match="kontext edits one image and takes no references"):
        portrait.edit(result_png, prompt="x", references=[result_png], out=tmp_path / "k2",
                      settings=home.with_(preset="tiny-flux"), steps=1, finish=False)


def test_bad_edits_are_one_line(home, result_png, tmp_path, astronaut, capsys):
    import portrait

    plain = tmp_path / "plain.png"
    Image.fromarray(astronaut).save(plain)
    with pytest.raises(BadInput, match="not a portrait result .* give --identity NAME"):
        portrait.edit(plain, prompt="x", out=tmp_path / "o1", settings=home)
    # no backend given on a preset without an edit model: the preset is named, not "--backend None"
    with pytest.raises(BadInput, match="^--preset tiny: portrait edit runs klein-ref.*sd15, which has no edit model"):
        portrait.edit(result_png, prompt="x", out=tmp_path / "o2", settings=home.with_(preset="tiny"))
    with pytest.raises(BadInput, match="^--backend lora: portrait edit runs klein-ref.* is flux2-klein$"):
        portrait.edit(result_png, prompt="x", backend="lora", out=tmp_path / "o2", settings=home)
    with pytest.raises(BadInput, match="at most 3 references"):
        portrait.edit(result_png, prompt="x", references=[plain] * 4, out=tmp_path / "o3", settings=home)
    with pytest.raises(BadInput, match="--out is inside the input"):
        portrait.edit(result_png, prompt="x", out=result_png.parent, settings=home)
    assert cli_run(["--home", str(home.home), "--preset", "tiny-flux2-klein", "edit", str(tmp_path / "nope.png"),
                    "--prompt", "x", "--out", str(tmp_path / "o4")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nope.png" in err and "Traceback" not in err
    # kontext outside an edit says how to run it
    from portrait.flows.generate import generate

    with pytest.raises(BadInput, match="portrait edit RESULT.png"):
        generate("ana", backend="kontext", prompt="x", n=1, out=tmp_path / "o5", settings=home.with_(preset="tiny-flux"))
