"""Templates as data: the shipped set, loading errors, and request resolution order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from portrait.core.config import load_preset
from portrait.core.errors import BadInput
from portrait.core.types import Identity
from portrait.stages import generate as gen
from portrait.stages import templates as tpl
from portrait.stages import metadata

REQUIRED_STYLES = {"business", "outdoor", "studio-bw", "film", "oil-painting", "cyberpunk", "traditional-dress",
                   "astronaut"}


def _identity(tmp_path: Path) -> Identity:
    return Identity(name="ann", root=tmp_path, trigger="sks", class_word="woman", reference=tmp_path / "r.png",
                    photos=(), consensus={}, loras={}, manifest={})


def test_shipped_templates_cover_the_styles_and_a_photo_template():
    templates = tpl.shipped_templates()
    styles = {t.name for t in templates if t.kind == "style"}
    assert REQUIRED_STYLES <= styles
    photos = [t for t in templates if t.kind == "photo"]
    assert any(t.name == "hopper" for t in photos)
    for t in templates:
        if t.kind == "style":
            assert "{trigger}" in t.prompt and "{class}" in t.prompt, t.name
        assert t.composition in tpl.COMPOSITIONS
    compositions = {t.composition for t in templates}
    assert {"merge", "switch", "composite"} <= compositions
    assert any(t.fast == "lcm" for t in templates)
    assert any(t.controls and t.controls[0].image is not None for t in templates if t.kind == "style")


def test_hopper_template_has_exactly_one_real_face(ctx):
    from portrait.core.faces import make_analyzer
    from portrait.core.formats.images import read_rgb

    hopper = tpl.find_template("hopper")
    assert hopper.kind == "photo" and hopper.image.is_file() and hopper.faces == 1
    faces = make_analyzer(ctx, "dlib").detect(read_rgb(hopper.image), embed=False)
    assert len(faces) == 1 and faces[0].width > 100


def test_unknown_and_broken_templates_are_bad_input(tmp_path):
    with pytest.raises(BadInput, match="unknown template 'nope'.*business"):
        tpl.find_template("nope")
    with pytest.raises(BadInput, match="no such template"):
        tpl.find_template(str(tmp_path / "missing.yaml"))
    broken = tmp_path / "broken.yaml"
    broken.write_text("prompt: [unclosed\n")
    with pytest.raises(BadInput, match="broken.yaml.*YAML"):
        tpl.find_template(str(broken))
    bad_mode = tmp_path / "mode.yaml"
    bad_mode.write_text("prompt: a photo of {trigger}\ncomposition: blend\n")
    with pytest.raises(BadInput, match="mode.yaml: composition: .*'blend'"):
        tpl.find_template(str(bad_mode))
    no_image = tmp_path / "pose.yaml"
    no_image.write_text("prompt: x\ncontrols:\n  openpose: {image: none.png, strength: 0.5}\n")
    with pytest.raises(BadInput, match="none.png does not exist"):
        tpl.find_template(str(no_image))


def test_user_template_file_and_photo_folder(tmp_path, hopper):
    from PIL import Image

    style = tmp_path / "mine.yaml"
    style.write_text("name: mine\nprompt: portrait of {trigger} {class} at dusk\nsteps: 12\n")
    assert tpl.find_template(str(style)).steps == 12
    folder = tmp_path / "navy"
    folder.mkdir()
    Image.fromarray(hopper).save(folder / "photo.jpg")
    (folder / "template.yaml").write_text("image: photo.jpg\nfaces: 1\n")
    t = tpl.find_template(str(folder))
    assert t.kind == "photo" and t.name == "navy" and t.image == folder / "photo.jpg"


def test_resolution_order_preset_then_template_then_overrides(tmp_path):
    policy = gen.GeneratePolicy.from_preset(load_preset("sd15"))
    person = _identity(tmp_path)
    business = tpl.find_template("business")
    req = gen.resolve_request(person, policy, template=business, prompt=None, backend=None, n=None, seed=5)
    assert req.backend == "lora" and req.n == policy.n and req.seed == 5
    assert (req.width, req.height) == (512, 640)
    assert req.steps == business.steps and req.guidance == business.guidance
    assert req.prompt.startswith("professional business headshot photo of sks woman")
    assert "{" not in req.prompt
    over = gen.resolve_request(person, policy, template=business, prompt=None, backend="lora", n=2, seed=5,
                               overrides={"steps": 9, "guidance": 3.5, "width": 256, "height": 320,
                                          "scheduler": "euler_a", "lora_weight": 0.5})
    assert (over.steps, over.guidance, over.width, over.height, over.scheduler, over.lora_weight) == \
        (9, 3.5, 256, 320, "euler_a", 0.5)
    resolved = over.record()
    assert resolved["steps"] == 9 and resolved["template"] == "business"


def test_tiny_preset_scales_sizes_and_caps_steps(tmp_path):
    policy = gen.GeneratePolicy.from_preset(load_preset("tiny"))
    req = gen.resolve_request(_identity(tmp_path), policy, template=tpl.find_template("business"), prompt=None,
                              backend=None, n=1, seed=0)
    assert (req.width, req.height) == (64, 80) and req.steps == 3
    sdxl = gen.GeneratePolicy.from_preset(load_preset("sdxl"))
    req = gen.resolve_request(_identity(tmp_path), sdxl, template=tpl.find_template("business"), prompt=None,
                              backend=None, n=1, seed=0)
    assert (req.width, req.height) == (1024, 1280) and req.width % 64 == 0


def test_prompt_without_template_and_random_seed_recorded(tmp_path):
    policy = gen.GeneratePolicy.from_preset(load_preset("tiny"))
    req = gen.resolve_request(_identity(tmp_path), policy, template=None, prompt="{trigger} {class} on a boat",
                              backend=None, n=1, seed=None)
    assert req.prompt == "sks woman on a boat" and req.template is None
    assert isinstance(req.seed, int) and 0 <= req.seed < 2**31


def test_bad_options_are_bad_input(tmp_path):
    policy = gen.GeneratePolicy.from_preset(load_preset("tiny"))
    person = _identity(tmp_path)
    business = tpl.find_template("business")
    with pytest.raises(BadInput, match="unknown backend 'dalle'"):
        gen.resolve_request(person, policy, template=business, prompt=None, backend="dalle", n=1, seed=0)
    with pytest.raises(BadInput, match="scheduler: input should be 'euler'.*got 'warp'"):
        gen.resolve_request(person, policy, template=business, prompt=None, backend=None, n=1, seed=0,
                            overrides={"scheduler": "warp"})
    with pytest.raises(BadInput, match="multiples of 8"):
        gen.resolve_request(person, policy, template=business, prompt=None, backend=None, n=1, seed=0,
                            overrides={"width": 65})
    with pytest.raises(BadInput, match="photo template"):
        gen.resolve_request(person, policy, template=business, prompt=None, backend="template", n=1, seed=0)


def test_a1111_parameters_format():
    text = metadata.a1111_parameters("a photo, sks", "blurry", {"Steps": 20, "Sampler": "DPM++ 2M", "CFG scale": "7",
                                                          "Seed": 1, "Size": "512x768",
                                                          "Lora hashes": "me: 0123456789ab", "Version": "portrait 0.1"})
    lines = text.split("\n")
    assert lines[0] == "a photo, sks" and lines[1] == "Negative prompt: blurry"
    assert lines[-1] == ('Steps: 20, Sampler: DPM++ 2M, CFG scale: 7, Seed: 1, Size: 512x768, '
                         'Lora hashes: "me: 0123456789ab", Version: portrait 0.1')


def test_templates_list_cli(capsys):
    import json

    from portrait.cli.main import run

    assert run(["templates", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert REQUIRED_STYLES <= {r["name"] for r in rows if r["kind"] == "style"}
    assert np.any([r["kind"] == "photo" for r in rows])
