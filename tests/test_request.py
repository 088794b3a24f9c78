"""One typed request from every door (issue 27).

- `resolve_request` returns the chosen backend's validated options as a typed object, and an
  option no backend of the request takes is refused with one line naming the backends that do;
- `--fast` (and `fast: lcm` in a template, a batch spec or a service request) is resolved once,
  for every backend, from what the backend declares (BackendSpec.fast): its LoRA, scheduler,
  steps and CFG; a backend that declares no fast mode refuses it with one line;
- the generate settings are declared once (portrait.core.request.GenerateSettings) and the CLI,
  the service's request models, the batch spec and the template file are generated from that
  declaration: a bound changed there moves all four doors.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import annotated_types
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _generate_helpers import write_tiny_identity  # noqa: E402
from hostile_helpers import cli, error_line  # noqa: E402

from portrait.core.errors import BadInput
from portrait.core.types import Identity

NAME = "req-eve"
ZS_NAME = "req-zs"


@pytest.fixture(scope="module")
def home(tiny_home, astronaut):
    from test_embed import make_identity

    write_tiny_identity(tiny_home, NAME, astronaut[80:336, 120:376])
    make_identity(tiny_home, ZS_NAME, [astronaut], reference=astronaut)  # photos, for the zero-shot backends
    return tiny_home


def _person(tmp_path: Path) -> Identity:
    return Identity(name="p", root=tmp_path, trigger="sks", class_word="woman", reference=tmp_path / "r.png",
                    photos=(), consensus={}, loras={}, manifest={})


def _resolve(tmp_path, backend, template="business", **overrides):
    from portrait.stages import generate as gen
    from portrait.stages.templates import find_template

    chosen = find_template(template) if template else None
    return gen.resolve_request(_person(tmp_path), gen.GeneratePolicy(), template=chosen, prompt=None if chosen else "x",
                               backend=backend, n=1, seed=1, overrides=overrides)


# --- options: typed, and only the request's backends' ------------------------------------------------


def test_an_option_of_another_backend_is_refused_naming_the_backends_that_take_it(home, capsys, tmp_path):
    out = tmp_path / "out"
    code, _, err = cli(capsys, home.home, "generate", "--identity", NAME, "--template", "business", "-b", "lora",
                       "--option", "pulid_mode=style", "--option", "id_weight=3", "--n", "1", "--out", str(out))
    assert code == 2, err
    line = error_line(err, "--option", "pulid_mode", "id_weight", "'lora'", "pulid", "pulid-flux")
    assert "unknown" not in line  # known options, of other backends
    assert not out.exists()


def test_the_request_carries_the_backends_options_as_a_typed_object(tmp_path):
    from portrait.stages.backends.template import TemplateOptions

    req = _resolve(tmp_path, "template", template="hopper", options={"denoise": 0.3, "passes": 1})
    assert isinstance(req.options, TemplateOptions)
    assert req.options.denoise == 0.3 and req.options.passes == 1 and req.options.crop_scale == 2.0  # typed, defaults in
    record = req.record()["options"]
    assert record["denoise"] == 0.3 and "crop_scale" not in record  # results.json records what was given
    # a template's options for another backend are the template's tuning for that backend: not this one's
    lora = _resolve(tmp_path, "lora", template="hopper")
    assert "denoise" not in lora.record()["options"] and not hasattr(lora.options, "denoise")


def test_a_batch_spec_refuses_an_option_none_of_its_backends_takes_and_splits_the_rest(tmp_path):
    from portrait.studio.spec import expand, parse_spec

    with pytest.raises(BadInput, match=r"pulid_mode.*\(pulid\)|pulid_mode.*pulid"):
        parse_spec({"output": "o", "identities": ["a"], "prompts": ["x"], "backends": ["lora", "faceid"],
                    "generate": {"options": {"pulid_mode": "style"}}})
    spec = parse_spec({"output": "o", "identities": ["a"], "prompts": ["x"], "backends": ["lora", "faceid"],
                       "generate": {"options": {"ip_adapter_scale": 0.5}}})
    job = expand(spec, base_dir=tmp_path, default_preset="sd15", identity_exists=lambda name: True)
    options = {i.payload["backend"]: i.payload["overrides"].get("options") for i in job.items}
    assert options == {"lora": None, "faceid": {"ip_adapter_scale": 0.5}}


# --- fast: resolved once, for every backend ------------------------------------------------------------


def _backends():
    from portrait.stages.backends import BACKENDS

    return BACKENDS.names()


@pytest.mark.parametrize("backend", _backends())
def test_fast_is_resolved_once_for_every_backend(tmp_path, backend):
    from portrait.stages.backends import BACKENDS

    spec = BACKENDS.get(backend)
    template = "hopper" if spec.photo_template else "business"
    if "lcm" in spec.fast:
        mode = spec.fast["lcm"]
        req = _resolve(tmp_path, backend, template=template, fast="lcm")
        assert (req.steps, req.scheduler, req.guidance) == (mode.steps, mode.scheduler, mode.guidance)
        assert req.resolved.fast == "lcm" and req.resolved.fast_lora == mode.lora
        # an explicit value still wins over the mode's
        req = _resolve(tmp_path, backend, template=template, fast="lcm", steps=8, guidance=2.0)
        assert (req.steps, req.guidance, req.scheduler) == (8, 2.0, mode.scheduler)
    else:
        takers = [s.name for s in BACKENDS.specs() if "lcm" in s.fast]
        with pytest.raises(BadInput) as refused:
            _resolve(tmp_path, backend, template=template, fast="lcm")
        line = str(refused.value)
        assert "\n" not in line and "fast" in line and f"'{backend}'" in line
        assert all(name in line for name in takers), line


def test_the_sd_backends_declare_lcm_with_the_lcm_lora():
    from portrait.stages.backends import BACKENDS

    for name in ("lora", "template", "faceid", "instantid", "photomaker"):
        mode = BACKENDS.get(name).fast["lcm"]
        assert (mode.lora, mode.scheduler, mode.steps, mode.guidance) == ("lcm_lora", "lcm", 6, 1.5), name


def test_a_mode_the_backend_does_not_do_is_refused_and_a_templates_is_left_out(tmp_path):
    """Composition and ControlNets are declared per backend too (BackendSpec.compositions, .controls)."""
    with pytest.raises(BadInput, match=r"--composition switch: backend 'faceid' combines LoRAs by merge only "
                                       r"\(switch: lora\)"):
        _resolve(tmp_path, "faceid", composition="switch")
    with pytest.raises(BadInput, match=r"--control canny: backend 'photomaker' takes no ControlNets \(backends "
                                       r"that do: lora, template, instantid, faceid\)"):
        _resolve(tmp_path, "photomaker", controls={"canny": 0.5})
    # a template's own modes are its tuning for the backends that have them
    assert _resolve(tmp_path, "lora", template="cyberpunk").resolved.composition == "composite"
    assert _resolve(tmp_path, "faceid", template="cyberpunk").resolved.composition == "merge"
    lora = _resolve(tmp_path, "lora", template="astronaut")
    assert "openpose" in lora.controls and "openpose" in lora.resolved.control_images
    photomaker = _resolve(tmp_path, "photomaker", template="astronaut")
    assert photomaker.controls == {} and photomaker.resolved.control_images == {}


def test_a_templates_style_lora_is_recorded_only_where_the_backend_applies_one(tmp_path):
    """A template's style LoRA used to ride in every backend's request.resolved (so results.json
    and the metadata of a faceid or instantid image claimed it); a backend declares whether it
    applies one (BackendSpec.style_lora) and the request records only what runs."""
    from portrait.stages import generate as gen
    from portrait.stages.backends import BACKENDS
    from portrait.stages.templates import load_template_file

    path = tmp_path / "styled.yaml"
    path.write_text("prompt: a photo of {trigger}\nstyle_lora: {model: tiny-style-lora-sd15, weight: 0.8}\n")
    styled = load_template_file(path, "style")
    applying = [s.name for s in BACKENDS.specs() if s.style_lora]
    assert applying == ["lora", "template", "zimage"]
    for spec in BACKENDS.specs():
        if spec.photo_template:
            continue  # takes a photo template, not this style template
        req = gen.resolve_request(_person(tmp_path), gen.GeneratePolicy(), template=styled, prompt=None,
                                  backend=spec.name, n=1, seed=1)
        expected = {"model": "tiny-style-lora-sd15", "weight": 0.8} if spec.style_lora else None
        assert req.resolved.style_lora == expected, spec.name
        assert req.record()["options"]["style_lora"] == expected, spec.name


def test_a_batch_specs_fast_mode_gets_the_modes_steps_not_the_templates(tmp_path):
    """`fast: lcm` in a spec used to keep the template's 30 steps and DPM++."""
    from portrait.studio.spec import expand, parse_spec

    spec = parse_spec({"output": "o", "identities": ["a"], "templates": ["business"], "generate": {"fast": "lcm"}})
    (item,) = expand(spec, base_dir=tmp_path, default_preset="sd15", identity_exists=lambda name: True).items
    req = _resolve(tmp_path, "lora", **item.payload["overrides"])
    assert (req.steps, req.scheduler, req.guidance) == (6, "lcm", 1.5)


def test_a_template_that_asks_for_fast_keeps_its_own_numbers_and_gets_the_mode_for_the_rest(tmp_path):
    from portrait.stages.templates import find_template, load_template_file

    shipped = find_template("fast-headshot")
    assert shipped.fast == "lcm"
    req = _resolve(tmp_path, "lora", template="fast-headshot")
    assert (req.steps, req.scheduler, req.guidance) == (6, "lcm", 1.5) and req.resolved.fast == "lcm"
    bare = tmp_path / "bare.yaml"
    bare.write_text("prompt: a photo of {trigger}\nfast: lcm\nsteps: 4\n")
    t = load_template_file(bare, "style")
    from portrait.stages import generate as gen

    req = gen.resolve_request(_person(tmp_path), gen.GeneratePolicy(), template=t, prompt=None, backend="lora", n=1,
                              seed=1)
    assert (req.steps, req.scheduler, req.guidance) == (4, "lcm", 1.5)


def test_faceid_fast_attaches_the_lcm_lora(home, capsys, tmp_path):
    """`-b faceid --fast` used to render 6 LCM steps without the LCM-LoRA."""
    out = tmp_path / "out"
    code, _, err = cli(capsys, home.home, "generate", "--identity", ZS_NAME, "--prompt", "a photo of {trigger}",
                       "-b", "faceid", "--fast", "--n", "1", "--seed", "3", "--no-finish", "--out", str(out))
    assert code == 0, err
    run = json.loads((out / "results.json").read_text())
    assert run["request"]["scheduler"] == "lcm" and run["request"]["guidance"] == 1.5
    loras = run["results"][0]["info"]["loras"]
    assert [u["role"] for u in loras][-1] == "lcm", loras
    from portrait.core.io import read_png_text

    assert "<lora:lcm-lora-sd15:1>" in read_png_text(out / run["results"][0]["path"])["parameters"]


def test_fast_on_a_backend_without_a_fast_mode_is_one_line(home, capsys, tmp_path):
    out = tmp_path / "out"
    code, _, err = cli(capsys, home.home, "generate", "--identity", NAME, "--prompt", "x", "-b", "pulid", "--fast",
                       "--n", "1", "--out", str(out))
    assert code == 2, err
    error_line(err, "--fast", "'pulid'", "faceid")
    assert not out.exists()


# --- declared once, generated everywhere --------------------------------------------------------------


def _with_steps_at_most(monkeypatch, limit: int) -> None:
    """One bound changed in the declaration, the way a maintainer would change it there."""
    from portrait.core.request import GenerateSettings

    declared = copy.copy(GenerateSettings.model_fields["steps"])
    declared.metadata = [m for m in declared.metadata if not isinstance(m, annotated_types.Le)] + \
        [annotated_types.Le(limit)]
    monkeypatch.setitem(GenerateSettings.model_fields, "steps", declared)


def test_one_bound_changed_in_the_declaration_moves_all_four_doors(home, monkeypatch, capsys, tmp_path):
    from fastapi.testclient import TestClient

    from portrait.cli.main import build_app, run
    from portrait.service.app import create_app
    from portrait.service.service import StudioService
    from portrait.stages.templates import load_template_file
    from portrait.studio.spec import parse_spec
    from serve_helpers import service_home

    # before: 41 steps pass every door
    parse_spec({"output": "o", "identities": ["a"], "prompts": ["x"], "steps": 41})
    _with_steps_at_most(monkeypatch, 40)

    # the CLI (generated when the app is built)
    app = build_app()
    capsys.readouterr()
    code = run(["--home", str(home.home), "--preset", "tiny", "generate", "-i", NAME, "--prompt", "x", "--steps", "41",
                "--out", str(tmp_path / "out")], app=app)
    err = capsys.readouterr().err
    assert code == 2, err
    error_line(err, "--steps", "40")
    capsys.readouterr()
    run(["generate", "--help"], app=app)
    assert "1<=x<=40" in capsys.readouterr().out

    # the service's request models
    client = TestClient(create_app(StudioService(service_home(home, tmp_path / "svc")), auth="none"))
    schema = client.get("/openapi.json").json()["components"]["schemas"]
    for model in ("GenerateRequest", "BatchRequest"):
        steps = schema[model]["properties"]["steps"]
        assert {"maximum": 40, "minimum": 1, "type": "integer"} in steps["anyOf"], steps
    response = client.post("/v1/jobs/generate", json={"identity": "x", "prompt": "x", "steps": 41})
    assert response.status_code == 422 and "steps" in response.json()["detail"], response.text

    # the batch spec
    with pytest.raises(BadInput, match="steps.*40"):
        parse_spec({"output": "o", "identities": ["a"], "prompts": ["x"], "steps": 41})
    with pytest.raises(BadInput, match="steps.*40"):
        parse_spec({"output": "o", "identities": ["a"], "prompts": ["x"], "generate": {"steps": 41}})

    # the template file
    file = tmp_path / "t.yaml"
    file.write_text("prompt: a photo of {trigger}\nsteps: 41\n")
    with pytest.raises(BadInput, match=r"t\.yaml.*steps.*40"):
        load_template_file(file, "style")


def test_a_generated_option_out_of_bounds_is_one_line_with_the_option_value_and_bound(home, capsys, tmp_path):
    """click's range types said `Invalid value for '--steps': Input should be less than or equal
    to 1000` (no value); the generated options say the option, the value and the bound, exit 2,
    before anything runs (nothing is written)."""
    out = tmp_path / "out"
    for args, line in ((("--steps", "5000"), "error: --steps 5000: input should be less than or equal to 1000"),
                       (("--steps", "0"), "error: --steps 0: input should be greater than or equal to 1"),
                       (("--guidance", "-1"), "error: --guidance -1: input should be greater than or equal to 0"),
                       (("--steps", "2.5"), "error: --steps 2.5: input should be a valid integer"),
                       (("--lora-weight", "9"), "error: --lora-weight 9: input should be less than or equal to 5"),
                       # a choice: typer's pydantic check said "Value error, 'bogus' is not one of ..."
                       (("--scheduler", "bogus"), "error: Invalid value for '--scheduler': 'bogus' is not one of "
                                                  "'euler', ")):
        code, _, err = cli(capsys, home.home, "generate", "-i", NAME, "--prompt", "x", *args, "--out", str(out))
        assert code == 2, err
        assert error_line(err).startswith(line), err
        assert not out.exists()
    # the same parser reads the other commands' generated options
    code, _, err = cli(capsys, home.home, "edit", str(tmp_path / "none.png"), "--prompt", "x", "--steps", "1001")
    assert code == 2 and error_line(err).startswith("error: --steps 1001: input should be less than or equal to 1000")
    code, _, _ = cli(capsys, home.home, "generate", "--help")
    assert code == 0


def test_the_doors_name_the_same_settings():
    """Every declared setting reaches every door (the template file writes the size as `size`)."""
    from portrait.cli.main import build_app
    from portrait.core.request import GenerateSettings, door_names
    from portrait.service.requests import generate_request_model
    from portrait.stages.templates import template_file_model
    from portrait.studio.spec import job_spec_model

    declared = door_names(GenerateSettings)
    assert {"size", "steps", "guidance", "scheduler", "lora_weight", "fast", "options"} <= declared
    assert declared <= set(generate_request_model().model_fields)
    assert declared <= set(job_spec_model().model_fields)
    template = set(template_file_model().model_fields)
    assert declared - {"negative_prompt", "options", "controls"} <= template  # its own `negative` and richer controls
    import typer.main

    command = typer.main.get_command(build_app()).commands["generate"]
    flags = {opt for p in command.params for opt in p.opts}
    assert {"--size", "--steps", "--guidance", "--scheduler", "--lora-weight", "--composition", "--fast", "--option",
            "--control", "--negative-prompt"} <= flags


@pytest.mark.parametrize("backend,prompt", [("instantid", "a photo of a woman"),
                                            ("photomaker", "a photo of a woman img")])
def test_the_sdxl_zero_shot_backends_attach_the_lcm_lora_when_fast(home, backend, prompt):
    from portrait.core.bundle import load_identity
    from portrait.core.context import RunContext
    from portrait.stages import generate as gen

    ctx = RunContext.create(home, preset="tiny-sdxl")
    request = gen.resolve_request(load_identity(home, ZS_NAME), gen.GeneratePolicy.from_preset(ctx.preset),
                                  template=None, prompt=prompt, backend=backend, n=1, seed=2,
                                  overrides={"fast": "lcm", "width": 64, "height": 64, "steps": 2})
    assert (request.scheduler, request.guidance, request.steps) == ("lcm", 1.5, 2)
    (candidate,) = gen.generate_candidates(request, ctx)
    assert [u["role"] for u in candidate.info["loras"]] == ["lcm"], candidate.info["loras"]
    assert candidate.info["loras"][0]["name"] == "lcm-lora-sdxl"
