"""The backend table: a backend is one module plus one line (here a toy backend from the tests
folder, registered at run time), and everything that names backends reads the table."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest

from portrait.core.config import BASE_FAMILIES
from PIL import Image

import toy_backend
from hostile_helpers import cli, error_line
from portrait.core.errors import BadInput
from portrait.stages.backends import BACKENDS, register, unregister

STAGES = Path(__file__).resolve().parents[1] / "portrait" / "stages"


@pytest.fixture()
def toy():
    register(toy_backend.SPEC)  # the one line that adds a backend
    yield toy_backend.SPEC
    unregister("toy")


@pytest.fixture(scope="module")
def home(tmp_path_factory, tiny_home, hopper):
    """A home of its own sharing the session's tiny models (the toy embeds faces with the tiny
    antelopev2 pack), with one identity whose photo shows a face."""
    from portrait.core.config import Settings

    from test_embed import make_identity

    root = tmp_path_factory.mktemp("backends-home")
    (root / "models").symlink_to(tiny_home.models_dir, target_is_directory=True)
    settings = Settings(home=root, preset="tiny", device="cpu")
    make_identity(settings, "toy-ann", [hopper])
    return settings


def test_the_table_lists_the_shipped_backends_with_their_declarations():
    assert BACKENDS.names() == ("lora", "template", "instantid", "faceid", "photomaker", "pulid", "flux",
                                "infiniteyou", "pulid-flux", "klein-ref", "qwen-edit", "zimage", "kontext")
    for spec in BACKENDS.specs():
        assert spec.help and spec.families and set(spec.families) <= set(BASE_FAMILIES)
        assert spec.options.model_config.get("extra") == "forbid", spec.name
    assert [s.name for s in BACKENDS.specs() if s.needs_lora] == ["lora", "template"]
    assert [s.name for s in BACKENDS.specs() if s.group] == ["template", "faceid", "klein-ref", "qwen-edit"]
    # one key, per-backend defaults (the reference code's): FaceID 0.6, InstantID 0.8
    assert BACKENDS.get("faceid").read({}).ip_adapter_scale == 0.6
    assert BACKENDS.get("instantid").read({"ip_adapter_scale": 0.5}).ip_adapter_scale == 0.5
    assert BACKENDS.get("instantid").read({}).controlnet_conditioning_scale == 0.8
    with pytest.raises(ValueError, match="already registered"):
        register(BACKENDS.get("lora"))


def test_dispatch_runs_one_way_through_the_table():
    """No backend imports the generate stage (or another backend), and the generate stage
    imports no backend by string."""
    generate = (STAGES / "generate.py").read_text()
    assert "importlib" not in generate and "import_module" not in generate
    names = {p.stem for p in (STAGES / "backends").glob("*.py")} - {"__init__"}
    for path in (STAGES / "backends").glob("*.py"):
        if path.stem == "__init__":
            continue
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
                imported.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                imported.update(a.name for a in node.names)
        assert not {m for m in imported if m.endswith("stages.generate")}, path.name
        others = {f"portrait.stages.backends.{n}" for n in names - {path.stem}}
        assert not imported & others, (path.name, imported & others)


def test_face_spaces_are_declared_by_the_backends_not_the_embed_stage():
    """Each zero-shot backend declares the face space its adapter reads on its SPEC (its own
    module, or the shared stage module of the adapter it runs); stages/embed.py is handed the
    space and names no backend or adapter in its code (docstrings aside)."""
    tree = ast.parse((STAGES / "embed.py").read_text())
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef)) and n.body
                  and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    strings = {n.value for n in ast.walk(tree)
               if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings}
    spaces = {name: spec.adapter_space({}) for name, spec in zip(BACKENDS.names(), BACKENDS.specs())}
    adapters = {s.adapter for s in spaces.values() if s} | {"faceid_plus"}
    assert not strings & (set(BACKENDS.names()) | adapters), strings & (set(BACKENDS.names()) | adapters)
    assert {n: (s.adapter, s.pack, s.normalized) for n, s in spaces.items() if s} == {
        "instantid": ("instantid", "antelopev2", False), "faceid": ("faceid_plus", "buffalo_l", True),
        "photomaker": ("photomaker_v2", "buffalo_l", False), "pulid": ("pulid", "antelopev2", False),
        "infiniteyou": ("infiniteyou", "antelopev2", True), "pulid-flux": ("pulid", "antelopev2", False)}
    assert BACKENDS.get("faceid").adapter_space({"faceid_variant": "faceid"}).adapter == "faceid"
    assert BACKENDS.get("photomaker").adapter_space({"photomaker_version": "v1"}) is None
    assert BACKENDS.get("template").adapter_space({"identity_adapter": "faceid"}).pack == "buffalo_l"
    assert BACKENDS.get("infiniteyou").adapter_space({}).embedder == "facexlib:arcface-irse50"


def test_a_registered_backend_is_in_the_cli_help(toy, capsys, home):
    code, out, err = cli(capsys, home.home, "generate", "--help")
    assert code == 0, err
    assert "toy (sd15, sdxl): a flat grey test card" in " ".join(out.split())
    for name in BACKENDS.names():
        assert name in out
    unregister("toy")
    code, out, _ = cli(capsys, home.home, "generate", "--help")
    assert code == 0 and "toy" not in out


def test_a_registered_backend_passes_spec_validation(toy, tmp_path):
    from portrait.studio.spec import expand, parse_spec

    (tmp_path / "photos").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "photos" / "a.png")
    spec = parse_spec({"output": "out", "identities": [{"name": "toy-bob", "photos": "photos"}],
                       "prompts": ["a photo of {trigger}"], "backends": ["toy"],
                       "generate": {"options": {"toy_shade": 7}}})
    job = expand(spec, base_dir=tmp_path, default_preset="tiny", identity_exists=lambda name: False)
    kinds = [(i.kind, i.payload.get("backend"), i.payload.get("zero_shot")) for i in job.items]
    assert ("train", None, True) in kinds  # toy needs no LoRA: the identity is prepared, not trained
    assert ("generate", "toy", None) in kinds
    with pytest.raises(BadInput, match="toy_shade"):  # bounds come from the toy's declaration
        parse_spec({"output": "out", "identities": ["toy-ann"], "prompts": ["x"], "backends": ["toy"],
                    "generate": {"options": {"toy_shade": 300}}})
    unregister("toy")
    with pytest.raises(BadInput, match=r"unknown backend toy \(known: lora, template"):
        parse_spec({"output": "out", "identities": ["toy-ann"], "prompts": ["x"], "backends": ["toy"]})


def test_a_registered_backend_runs_end_to_end_and_is_recorded(toy, capsys, home, tmp_path):
    out = tmp_path / "out"
    code, text, err = cli(capsys, home.home, "generate", "--identity", "toy-ann", "--prompt", "a photo of {trigger}",
                          "--backend", "toy", "--n", "2", "--seed", "5", "--size", "64x64", "--option",
                          "toy_shade=40", "--no-finish", "--out", str(out))
    assert code == 0, err
    data = json.loads((out / "results.json").read_text())
    assert data["backend"] == "toy"
    assert [r["seed"] for r in data["results"]] == [5, 6]
    for row in data["results"]:
        with Image.open(out / row["path"]) as im:
            pixels = np.asarray(im.convert("RGB"), dtype=np.float64)
            meta = json.loads(im.text["portrait"])
        assert abs(pixels.mean() - 40) < 2
        assert meta["request"]["backend"] == "toy" and meta["request"]["options"]["toy_shade"] == 40
        assert meta["info"]["identity_mode"] == "toy"
        # the face space the toy declares (antelopev2, normalized) is the one its identity was embedded in
        assert meta["info"]["embedding"]["space"] == "insightface:antelopev2"
        assert meta["info"]["embedding"]["normalized"] is True and meta["info"]["embedding_norm"] == 1.0
    # the toy's option is checked against its declaration before anything runs
    bad = tmp_path / "bad"
    code, _, err = cli(capsys, home.home, "generate", "--identity", "toy-ann", "--prompt", "x", "--backend", "toy",
                       "--option", "toy_shade=300", "--no-finish", "--out", str(bad))
    assert code == 2
    error_line(err, "--option toy_shade", "less than or equal to 255")
    assert not bad.exists()


def test_an_unregistered_backend_and_its_options_are_unknown(capsys, home, tmp_path):
    code, _, err = cli(capsys, home.home, "generate", "--identity", "toy-ann", "--prompt", "x", "--backend", "toy",
                       "--no-finish", "--out", str(tmp_path / "o"))
    assert code == 2
    error_line(err, "unknown backend 'toy'", "photomaker")
    code, _, err = cli(capsys, home.home, "generate", "--identity", "toy-ann", "--prompt", "x",
                       "--option", "toy_shade=3", "--no-finish", "--out", str(tmp_path / "o"))
    assert code == 2
    error_line(err, "--option toy_shade", "unknown option", "ip_adapter_scale")


def test_the_service_lists_the_table_with_each_options_schema(toy, home):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from portrait.service.app import create_app
    from portrait.service.service import StudioService

    service = StudioService(home)
    _, token = service.db.create_token("acme")
    client = TestClient(create_app(service))
    response = client.get("/v1/backends", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.text
    rows = {row["name"]: row for row in response.json()}
    assert list(rows) == [*BACKENDS.names()] and list(rows)[-1] == "toy"
    shade = rows["toy"]["options"]["properties"]["toy_shade"]
    assert (shade["default"], shade["minimum"], shade["maximum"]) == (128, 0, 255)
    assert rows["toy"]["needs_lora"] is False and rows["lora"]["needs_lora"] is True
    assert rows["faceid"]["options"]["properties"]["ip_adapter_scale"]["default"] == 0.6
    assert rows["instantid"]["options"]["properties"]["ip_adapter_scale"]["default"] == 0.8
    assert client.get("/v1/backends").status_code == 401  # a tenant's token, as every catalogue call


def test_each_backend_declares_the_space_it_is_conditioned_with():
    """The finish's scoring reads the conditioning space from the backend table (no per-backend
    map in the score stage): a new backend declares it in its own module."""
    import dataclasses

    from portrait.flows.finish import conditioning_space
    from portrait.stages.backends import BACKENDS, register, unregister

    picked = "dlib"  # the space whose similarity picked the LoRA's checkpoints
    assert conditioning_space("lora", {}, picked) == "dlib"
    assert conditioning_space("template", {}, picked) == "dlib"
    assert conditioning_space("template", {"identity_adapter": "faceid"}, picked) == "insightface:buffalo_l"
    assert conditioning_space("faceid", {}, picked) == "insightface:buffalo_l"
    assert conditioning_space("photomaker", {}, picked) == "insightface:buffalo_l"
    assert conditioning_space("photomaker", {"photomaker_version": "v1"}, picked) is None
    assert conditioning_space("flux", {}, picked) is None
    for name in ("instantid", "pulid", "pulid-flux", "infiniteyou"):
        assert conditioning_space(name, {}, picked) == "insightface:antelopev2", name
    toy = dataclasses.replace(BACKENDS.get("lora"), name="toy-conditioned", conditioning="auraface")
    register(toy)
    try:
        assert conditioning_space("toy-conditioned", {}, picked) == "auraface"
    finally:
        unregister("toy-conditioned")


def test_a_backend_from_one_file_reaches_every_door(capsys, home, tmp_path):
    """tests/toy_backend.py alone adds a backend (and the kind of model it loads): `register()`
    there, and it is in `portrait generate --help`, the model kinds, the service's catalogue
    (GET /v1/backends, with its options' schema) and the web page, which builds its backend list
    from that catalogue. No project file names it."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from portrait.core.models import kinds
    from portrait.service.app import create_app
    from portrait.service.service import StudioService

    root = Path(__file__).resolve().parents[1] / "portrait"
    assert not [p for p in root.rglob("*") if p.is_file() and p.suffix in (".py", ".yaml", ".js", ".html")
                and ("toy_backend" in p.read_text(errors="ignore") or "toy-card" in p.read_text(errors="ignore"))]
    toy_backend.register()
    try:
        code, out, _ = cli(capsys, home.home, "generate", "--help")
        assert code == 0 and "toy (sd15, sdxl): a flat grey test card" in " ".join(out.split())
        assert kinds()["toy-card"].startswith("A toy card's shade")
        # its face space, declared in its own file: embed.py takes it from the SPEC, the finish
        # scores knowing the toy was conditioned in antelopev2, and a wrong pack is refused by name
        from portrait.flows.finish import conditioning_space

        assert BACKENDS.get("toy").adapter_space({}) is toy_backend.FACE_SPACE
        assert conditioning_space("toy", {}, "dlib") == "insightface:antelopev2"
        code, _, _ = cli(capsys, home.home, "generate", "--identity", "toy-ann", "--prompt", "x", "--backend", "toy",
                         "--seed", "1", "--size", "64x64", "--no-finish", "--out", str(tmp_path / "one-file"))
        assert code == 0
        row = json.loads((tmp_path / "one-file" / "results.json").read_text())["results"][0]
        with Image.open(tmp_path / "one-file" / row["path"]) as im:
            info = json.loads(im.text["portrait"])["info"]
        assert info["embedding"] == {"space": "insightface:antelopev2", "normalized": True, "mode": "mean",
                                     "photos": [info["embedding"]["photos"][0]]}
        code, _, err = cli(capsys, home.home, "generate", "--identity", "toy-ann", "--prompt", "x", "--backend", "toy",
                           "--option", "face_pack=buffalo_l", "--no-finish", "--out", str(tmp_path / "wrong-pack"))
        assert code == 2
        error_line(err, "toy was trained on insightface antelopev2", "face_pack=antelopev2")
        service = StudioService(home)
        _, token = service.db.create_token("acme")
        client = TestClient(create_app(service))
        rows = {r["name"]: r for r in client.get("/v1/backends", headers={"Authorization": f"Bearer {token}"}).json()}
        assert rows["toy"]["options"]["properties"]["toy_shade"]["maximum"] == 255
    finally:
        toy_backend.unregister()
    assert "toy" not in BACKENDS.names() and "toy-card" not in kinds()


def test_the_web_page_lists_backends_from_the_catalogue(home):
    """The page the service serves builds its backend list from GET /v1/backends, so a backend
    registered from one file (above) reaches the web UI too."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from portrait.service.app import create_app
    from portrait.service.service import StudioService

    client = TestClient(create_app(StudioService(home)))
    page = client.get("/").text
    scripts = [s for s in ("app.js",) if f"/static/{s}" in page]
    assert scripts and "/v1/backends" in client.get(f"/static/{scripts[0]}").text
