"""portrait.core.models, the one model door: it caches (a second load is the same object, built
once), verifies (a wrong or damaged file is one line, exit 2; a changed stand-in exit 3), names
the download command for a missing model (exit 3), picks ONNX providers that exist, and is the
only place models are built (an AST scan of the code base)."""

from __future__ import annotations

import ast
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from portrait.core.archs.photomaker import PHOTOMAKER_KEYS
from portrait.core import models
from portrait.core.cache import CacheKey
from portrait.core.config import Settings
from portrait.core.context import RunContext
from portrait.core.device import Placement
from portrait.core.errors import BadInput, ModelMissing
from portrait.core.integrity import ModelCorrupt

ROOT = Path(__file__).resolve().parents[1]
BUILT: list[Path] = []


@models.builder("test-door-linear", place=True)
def _linear(source, width: int = 4):
    """A toy kind: counts its builds."""
    BUILT.append(source.path)
    return torch.nn.Linear(width, width)


@pytest.fixture(scope="module")
def home(tiny_home):
    """The session's tiny home (every stand-in written once for the whole suite)."""
    return tiny_home


@pytest.fixture()
def adapter_file(tmp_path):
    path = tmp_path / "my-adapter.bin"
    torch.save({"image_proj": {"proj.weight": torch.ones(2, 2)}, "ip_adapter": {"1.to_k_ip.weight": torch.ones(2)}},
               path)
    return path


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert text and "\n" not in text and "Traceback" not in text, text
    return text


def test_a_second_load_is_the_same_object_built_once(home, adapter_file):
    ctx = RunContext.create(home, preset="tiny")
    BUILT.clear()
    loads = ctx.cache.loads
    first = models.load(ctx, "ip-adapter-faceid-sd15", "test-door-linear", path=adapter_file)
    assert models.load(ctx, "ip-adapter-faceid-sd15", "test-door-linear", path=adapter_file) is first
    assert BUILT == [adapter_file] and ctx.cache.loads == loads + 1
    wider = models.load(ctx, "ip-adapter-faceid-sd15", "test-door-linear", path=adapter_file, width=8)
    assert wider is not first and wider.in_features == 8 and len(BUILT) == 2  # the builder's args are in the key
    # one key scheme: (resolved id, device, dtype, (kind, file, explicit file stamp, args))
    spec_id = models.resolve(ctx, "ip-adapter-faceid-sd15", adapter_file).spec.id
    stat = adapter_file.stat()
    stamp = (str(adapter_file), stat.st_size, stat.st_mtime_ns)
    assert CacheKey(spec_id, "cpu", "float32", ("test-door-linear", None, stamp, ())) in ctx.cache
    assert CacheKey(spec_id, "cpu", "float32", ("test-door-linear", None, stamp, (("width", 8),))) in ctx.cache
    # the user's file replaced at the same path: built again, not the old model
    torch.save({"other": torch.zeros(1)}, adapter_file)
    os.utime(adapter_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert models.load(ctx, "ip-adapter-faceid-sd15", "test-door-linear", path=adapter_file) is not first
    assert len(BUILT) == 3
    # a fresh run context has its own cache: built again there
    models.load(RunContext.create(home, preset="tiny"), "ip-adapter-faceid-sd15", "test-door-linear", path=adapter_file)
    assert len(BUILT) == 4


def test_real_kinds_share_the_door_cache(home):
    from portrait.core.parsing import FaceParser, load_face_parser

    ctx = RunContext.create(home, preset="tiny")
    parser = load_face_parser(ctx, "face-parsing-bisenet")
    assert isinstance(parser, FaceParser) and parser.device == "cpu"
    assert models.load(ctx, "face-parsing-bisenet", "face-parser") is parser
    assert next(parser.network.parameters()).dtype == torch.float32  # fp32 on the CPU
    assert [k.variant[0] for k in ctx.cache.keys()] == ["face-parser"]


def test_adapter_kinds_read_the_weights_once(home, adapter_file):
    ctx = RunContext.create(home, preset="tiny")
    weights = models.load(ctx, "ip-adapter-faceid-sd15", "ip-adapter", path=adapter_file)
    assert weights.path == adapter_file and torch.equal(weights.state["image_proj"]["proj.weight"], torch.ones(2, 2))
    assert models.load(ctx, "ip-adapter-faceid-sd15", "ip-adapter", path=adapter_file) is weights
    with pytest.raises(BadInput) as caught:
        models.load(ctx, "photomaker-v1", "photomaker-checkpoint", path=adapter_file)
    assert _one_line(caught.value).startswith(f"{adapter_file}: not a PhotoMaker checkpoint")
    assert caught.value.exit_code == 2


def test_the_kinds_the_zero_shot_backends_load(home):
    """What branch `backends` switches to: adapter files, the CLIP vision encoder, PhotoMaker
    checkpoints and InstantID's ip-adapter + IdentityNet, on their tiny stand-ins."""
    ctx = RunContext.create(home, preset="tiny")
    faceid = models.load(ctx, "ip-adapter-faceid-sd15", "ip-adapter")
    instantid = models.load(ctx, ctx.preset.model("instantid_adapter"), "ip-adapter")
    for weights, name in ((faceid, "tiny-faceid-sd15"), (instantid, "tiny-instantid-adapter")):
        assert weights.model_id == name and weights.path.parent.name == name
        assert {"image_proj", "ip_adapter"} <= set(weights.state)
    assert instantid.state["image_proj"]["latents"].shape[1] == 16  # InstantID's 16-query Resampler
    for version in (1, 2):
        checkpoint = models.load(ctx, f"photomaker-v{version}", "photomaker-checkpoint")
        assert list(checkpoint.state) == PHOTOMAKER_KEYS and checkpoint.path.suffix == ".bin"
    vision, processor = models.load(ctx, ctx.preset.model("clip_vision"), "clip-vision", file="models/image_encoder")
    assert type(vision).__name__ == "CLIPVisionModelWithProjection" and not vision.training
    assert processor.crop_size["height"] == vision.config.image_size
    identitynet = models.load(ctx, ctx.preset.model("instantid_controlnet"), "controlnet")
    assert type(identitynet).__name__ == "ControlNetModel" and not identitynet.training
    assert models.load(ctx, ctx.preset.model("instantid_controlnet"), "controlnet") is identitynet


def test_a_file_that_does_not_match_the_registry_hash_is_refused(home, tmp_path):
    """The user's own parsing_bisenet.pth whose bytes are not the registry's: exit 2, one line."""
    ctx = RunContext.create(home, preset="sd15")
    wrong = tmp_path / "parsing_bisenet.pth"
    torch.save({"conv_out.conv.weight": torch.zeros(1)}, wrong)
    with pytest.raises(BadInput) as caught:
        models.load(ctx, "face-parsing-bisenet", "face-parser", path=wrong)
    text = _one_line(caught.value)
    assert caught.value.exit_code == 2 and text.startswith(str(wrong)) and "does not match the registry" in text
    assert not ctx.cache.keys() or all(k.variant[0] != "face-parser" for k in ctx.cache.keys())  # nothing cached


def test_a_damaged_file_is_refused_in_one_line(home, tmp_path):
    ctx = RunContext.create(home, preset="tiny")
    damaged = tmp_path / "parser.pth"
    damaged.write_bytes(b"PK\x03\x04 not a checkpoint")
    with pytest.raises(BadInput) as caught:
        models.load(ctx, "face-parsing-bisenet", "face-parser", path=damaged)
    assert caught.value.exit_code == 2
    assert _one_line(caught.value) == f"{damaged}: cannot be read as a weights-only torch checkpoint (RuntimeError)"
    missing = tmp_path / "absent.bin"
    with pytest.raises(BadInput, match=r"absent\.bin: no such file or folder \(given for model"):
        models.load(ctx, "face-parsing-bisenet", "face-parser", path=missing)


def test_a_changed_stand_in_is_refused_naming_the_rebuild(tmp_path):
    from portrait.core.registry import make_tiny

    settings = Settings(home=tmp_path, preset="tiny", device="cpu")
    make_tiny(settings, only=("tiny-face-parser",))
    (file,) = [p for p in (settings.models_dir / "tiny-face-parser").iterdir() if p.suffix == ".pth"]
    data = bytearray(file.read_bytes())
    data[-8] ^= 0xFF
    file.write_bytes(bytes(data))
    with pytest.raises(ModelCorrupt) as caught:
        models.load(RunContext.create(settings, preset="tiny"), "face-parsing-bisenet", "face-parser")
    assert caught.value.exit_code == 3 and "portrait models make-tiny --force" in _one_line(caught.value)


def test_a_missing_model_names_the_download_command(tmp_path):
    ctx = RunContext.create(Settings(home=tmp_path, device="cpu"), preset="sd15")
    with pytest.raises(ModelMissing) as caught:
        models.load(ctx, "face-parsing-bisenet", "face-parser")
    assert caught.value.exit_code == 3
    assert _one_line(caught.value).endswith("run `portrait models download face-parsing-bisenet`")


def test_an_unknown_kind_lists_the_known_ones(home):
    with pytest.raises(Exception, match=r"no model builder is registered for kind 'nope' \(known: .*face-parser"):
        models.load(RunContext.create(home, preset="tiny"), "face-parsing-bisenet", "nope")


@pytest.mark.parametrize("available, device, expected, ctx_id", [
    (["CPUExecutionProvider"], "cuda", ["CPUExecutionProvider"], -1),  # the CPU wheel on a CUDA machine
    (["CUDAExecutionProvider", "CPUExecutionProvider"], "cpu", ["CPUExecutionProvider"], -1),
    (["CUDAExecutionProvider", "CPUExecutionProvider"], "cuda",
     [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"], 0),
    # the device index follows cuda:N (it was 0 for every card)
    (["CUDAExecutionProvider", "CPUExecutionProvider"], "cuda:1",
     [("CUDAExecutionProvider", {"device_id": 1}), "CPUExecutionProvider"], 1),
])
def test_onnx_providers_never_ask_for_cuda_that_is_not_there(monkeypatch, available, device, expected, ctx_id):
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: list(available))
    dtype = "float16" if device.startswith("cuda") else "float32"
    ctx = SimpleNamespace(placement=Placement(device, dtype))
    assert models.onnx_providers(ctx) == expected
    assert models.onnx_providers(ctx.placement) == expected and models.onnx_providers(device) == expected
    assert models.onnx_ctx_id(ctx) == ctx_id


def test_cuda_asked_for_and_not_obtained_is_said_in_one_line(monkeypatch, capsys):
    """onnxruntime lists CUDA as available even when cuDNN fails to load, then runs the session on
    the CPU: the session's own providers are checked, and the fallback said once, in one line."""
    import onnxruntime

    from portrait.core import modelfiles

    monkeypatch.setattr(modelfiles, "ONNX_FALLBACKS", [])  # where the provider checks live
    asked = [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
    session = SimpleNamespace(get_providers=lambda: ["CPUExecutionProvider"])
    models.check_session(session, asked, "glintr100.onnx")
    models.check_session(session, asked, "glintr100.onnx")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "face analysis runs on the CPU" in err[0] and "CUDA provider for glintr100.onnx" in err[0]
    models.check_session(SimpleNamespace(get_providers=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]),
                         asked, "det_10g.onnx")
    models.check_session(session, ["CPUExecutionProvider"], "det_10g.onnx")  # CPU asked for: nothing to say
    assert capsys.readouterr().err == ""
    # the CPU wheel on a CUDA device: said once too, naming the GPU extra
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert models.onnx_providers("cuda") == ["CPUExecutionProvider"]
    line = capsys.readouterr().err.strip()
    assert "no CUDA provider" in line and "portrait[gpu]" in line and "\n" not in line


def test_real_session_reports_its_providers(tmp_path):
    """A real onnxruntime session on this machine (the CPU wheel): asking for CUDA ends on the
    CPU, which check_session reports (the path a failed cuDNN load takes on a GPU machine)."""
    import onnx
    import onnxruntime
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_providers() == ["CPUExecutionProvider"]


def test_onnx_providers_on_this_machine():
    import onnxruntime

    got = models.onnx_providers("cuda")
    names = [p[0] if isinstance(p, tuple) else p for p in got]
    assert names[-1] == "CPUExecutionProvider" and set(names) <= set(onnxruntime.get_available_providers())


# --- nothing builds a model outside the door ----------------------------------------------------

# Calls that build a model from files. They may appear only in the door (core/models.py), the
# diffusers composition it calls (core/loaders.py), architectures (core/archs/), the make-tiny
# writers (core/tiny/), or inside a function registered with `@builder(...)`.
FORBIDDEN = {"from_pretrained", "from_single_file", "torch.load", "InferenceSession", "get_model", "load_file"}
ALLOWED_FILES = ("portrait/core/models.py", "portrait/core/modelfiles.py", "portrait/core/loaders.py", "portrait/core/archs/",
                 "portrait/core/tiny/")
# Not registry models: the training run's own checkpoint state (RNG, optimizer), and the LoRA
# file reader (portrait.core.formats.lora) for the checkpoints and bundles the project writes.
# `portrait doctor`'s one-node test graph (built in memory) checks the CUDA provider, not a model.
OWN_FILES = {("portrait/stages/train.py", "torch.load"), ("portrait/core/formats/lora.py", "load_file"),
             ("portrait/doctor.py", "InferenceSession")}


def _call_name(node: ast.Call) -> str | None:
    func = node.func
    if isinstance(func, ast.Attribute):
        if func.attr == "load" and isinstance(func.value, ast.Name) and func.value.id == "torch":
            return "torch.load"
        return func.attr if func.attr in FORBIDDEN else None
    if isinstance(func, ast.Name) and func.id in FORBIDDEN:
        return func.id
    return None


def _is_builder(node: ast.AST) -> bool:
    decorators = getattr(node, "decorator_list", [])
    for deco in decorators:
        target = deco.func if isinstance(deco, ast.Call) else deco
        name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
        if name == "builder":
            return True
    return False


def forbidden_calls(source: str) -> list[tuple[int, str]]:
    """(line, call) of every model-building call outside a `@builder` function."""
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST, in_builder: bool) -> None:
        in_builder = in_builder or _is_builder(node)
        if isinstance(node, ast.Call) and not in_builder:
            name = _call_name(node)
            if name:
                found.append((node.lineno, name))
        for child in ast.iter_child_nodes(node):
            visit(child, in_builder)

    visit(ast.parse(source), False)
    return found


def test_the_scan_finds_a_forbidden_call_and_spares_builders():
    bad = "def load(ctx):\n    import torch\n    return torch.load('x.pt', weights_only=True)\n"
    assert forbidden_calls(bad) == [(3, "torch.load")]
    nested = "class A:\n    def m(self):\n        return CLIPModel.from_pretrained(p)\n"
    assert forbidden_calls(nested) == [(3, "from_pretrained")]
    session = "import onnxruntime\ns = onnxruntime.InferenceSession('m.onnx')\n"
    assert forbidden_calls(session) == [(2, "InferenceSession")]
    door = "@builder('clip-score')\ndef _b(source):\n    return CLIPModel.from_pretrained(source.folder)\n"
    assert forbidden_calls(door) == []


def test_every_model_loads_through_the_door():
    offenders = []
    files = [p for top in ("portrait",) for p in sorted((ROOT / top).rglob("*.py"))]
    assert len(files) > 50
    for path in files:
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(ALLOWED_FILES):
            continue
        for line, name in forbidden_calls(path.read_text()):
            if (rel, name) not in OWN_FILES:
                offenders.append(f"{rel}:{line}: {name}")
    assert not offenders, "load models through portrait.core.models.load (declare a Kind in portrait/core/archs/):\n" + "\n".join(offenders)
