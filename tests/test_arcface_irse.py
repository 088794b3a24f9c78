"""facexlib's ArcFace IR-SE50 (InfiniteYou's recognizer) and InfiniteYou's embedding recipe.

Oracles: facexlib's `facexlib/recognition/arcface_arch.py` (imports only torch) and InfiniteYou's
`extract_arcface_bgr_embedding` (its function alone, cut out of `pipelines/pipeline_infu_flux.py`
with `ast`: that module imports facexlib, optimum-quanto and huggingface_hub at the top, which the
lock does not have). Their outputs on our seeded weights and inputs are stored fixtures
(tests/reference_fixtures.py); `scripts/reference_fixtures.py` re-runs them from the fetched
mirrors. The reference moves its tensor with `.cuda()`; recording makes that a no-op on CPU.
"""

from __future__ import annotations

import ast
import importlib.util
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from portrait.core.archs import arcface_irse as arch
from portrait.core.context import RunContext
from portrait.core.errors import PortraitError
from portrait.core.models import load
from portrait.stages import embed as emb
from portrait.stages.backends.infiniteyou import FACE_SPACE as INFINITEYOU
from portrait.stages.pulid_features import FACE_SPACE as PULID

from reference_fixtures import max_diff, mirror, reference, seeded_state


def git_show(repo: str, path: str) -> str:
    """One file of a fetched mirror (recording only)."""
    return subprocess.run(["git", f"--git-dir={mirror(repo)}", "show", f"HEAD:{path}"], capture_output=True, text=True,
                          check=True).stdout


@pytest.fixture(scope="module")
def ctx(tiny_home):
    return RunContext.create(tiny_home, preset="tiny-flux")


@pytest.fixture(scope="module")
def tiny_model(ctx):
    return load(ctx, ctx.preset.model("arcface_infiniteyou"), "arcface-irse50")


def test_release_layout_has_the_release_size():
    """IR-SE50 built from facexlib's unit table: its fp32 tensors are the release file's bytes
    (175,367,323 in the registry) less pickle framing, which fails on any missing or extra unit."""
    state = arch.ArcFaceIRSE(arch.facexlib_units(50)).state_dict()
    data = sum(v.numel() * v.element_size() for v in state.values())
    assert arch.detect(state) and len(state) == 397
    assert 0 < 175_367_323 - data < 200_000, data


def facexlib_module(tmp_path: Path):
    source = git_show("xinntao+facexlib", "facexlib/recognition/arcface_arch.py")
    path = tmp_path / "arcface_arch.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("facexlib_arcface_arch", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_loads_facexlib_backbone_and_matches_its_forward(tmp_path):
    """facexlib's own Backbone(50, 0.6, 'ir_se'): same keys, strict load, same embedding; its
    plain `ir` layout (no SE) is another network and is refused."""
    ours = arch.ArcFaceIRSE(arch.facexlib_units(50))
    state = seeded_state(ours, 0)
    assert arch.detect(state.keys())
    ours = arch.build(state)
    assert set(ours.state_dict()) == set(state) and ours.input_size == 112
    x = torch.rand(1, 3, 112, 112, generator=torch.Generator().manual_seed(1)) * 2 - 1

    def facexlib():
        module = facexlib_module(tmp_path)
        theirs = module.Backbone(num_layers=50, drop_ratio=0.6, mode="ir_se")
        theirs.load_state_dict(state, strict=True)
        plain = module.Backbone(num_layers=50, drop_ratio=0.6, mode="ir").state_dict()
        with torch.no_grad():
            return {"embedding": theirs.eval()(x), "plain_has_se": float(arch.detect(plain.keys())),
                    "keys": float(len(theirs.state_dict()))}

    theirs = reference("irse50_backbone", facexlib)
    with torch.no_grad():
        a = ours(x)
    diff = max_diff(a, theirs["embedding"])
    print(f"IR-SE50 vs facexlib Backbone: max |embedding diff| {diff:.2e}")
    assert diff <= 1e-5 and abs(float(a.norm()) - 1.0) < 1e-5
    assert int(theirs["keys"]) == len(state) and theirs["plain_has_se"] == 0.0


def test_detect_refuses_other_layouts(tiny_model):
    good = tiny_model.state_dict()
    assert arch.detect(good.keys())
    no_se = {k: v for k, v in good.items() if ".res_layer.5." not in k}  # facexlib mode='ir'
    no_head = {k: v for k, v in good.items() if not k.startswith("output_layer.3")}
    iresnet = ["conv1.weight", "bn1.weight", "layer1.0.conv1.weight", "layer1.0.prelu.weight", "fc.weight",
               "features.weight"]  # insightface's iresnet (glintr100 / w600k_r50 in torch)
    prefixed = {f"module.{k}": v for k, v in good.items()}  # a DataParallel dump is not the release
    for keys in (no_se.keys(), no_head.keys(), iresnet, prefixed.keys(), []):
        assert not arch.detect(keys)
    with pytest.raises(ValueError):
        arch.build(no_se)


def test_door_names_a_wrong_file(ctx, tmp_path):
    bad = tmp_path / "not_arcface.pth"
    torch.save({"conv1.weight": torch.zeros(4, 3, 3, 3), "fc.weight": torch.zeros(512, 4)}, bad)
    with pytest.raises(PortraitError, match="not_arcface.pth.*ArcFace IR-SE"):
        load(ctx, "arcface-irse50", "arcface-irse50", path=bad)


def test_tiny_stand_in_has_the_release_key_layout(tiny_model):
    import re

    def forms(keys):  # key names with the unit index left out
        return {re.sub(r"^body\.\d+\.", "body.*.", k) for k in keys}

    keys = set(tiny_model.state_dict())
    release = set(arch.ArcFaceIRSE(arch.facexlib_units(50)).state_dict())
    assert forms(keys) == forms(release)  # every key form the release has, no other
    # both unit kinds: width-changing (conv shortcut) and width-keeping (MaxPool shortcut, no keys)
    assert "body.1.shortcut_layer.0.weight" in keys and "body.2.shortcut_layer.0.weight" not in keys
    assert tiny_model.input_size == 112 and tiny_model.output_layer[3].out_features == 512


def reference_extract():
    """InfiniteYou's `extract_arcface_bgr_embedding`, exec'd from its own source (recording only)."""
    from insightface.utils import face_align

    source = git_show("bytedance+InfiniteYou", "pipelines/pipeline_infu_flux.py")
    tree = ast.parse(source)
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "extract_arcface_bgr_embedding")
    namespace = {"np": np, "torch": torch, "face_align": face_align}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), "pipeline_infu_flux.py", "exec"), namespace)
    return namespace["extract_arcface_bgr_embedding"]


def test_embedding_matches_infiniteyou_reference(ctx, tiny_model, hopper, astronaut, monkeypatch):
    """Our RGB-in recognizer vs the reference fed as its pipeline feeds it (cv2 RGB2BGR photo,
    antelopev2-style 5 keypoints): the same vector."""
    ours = emb.TorchArcFace(tiny_model)
    space = INFINITEYOU
    locator = emb.make_locator(ctx, space, emb.EmbedPolicy())
    faces = [emb.largest_face(locator, photo) for photo in (hopper, astronaut)]
    assert all(face is not None for face in faces)

    def infiniteyou():
        extract = reference_extract()
        monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
        with torch.no_grad():
            found = {f"photo{i}": extract(cv2.cvtColor(photo, cv2.COLOR_RGB2BGR), face.kps, tiny_model)
                     for i, (photo, face) in enumerate(zip((hopper, astronaut), faces))}
        return found | {f"kps{i}": face.kps for i, face in enumerate(faces)}  # the points both sides read

    theirs = reference("infiniteyou_arcface_embedding", infiniteyou)
    vectors = []
    for i, (photo, face) in enumerate(zip((hopper, astronaut), faces)):
        assert np.abs(face.kps - theirs[f"kps{i}"]).max() < 0.5  # the locator still finds the recorded face
        kps = theirs[f"kps{i}"]
        mine = ours.embed(photo, kps)
        diff = max_diff(mine, theirs[f"photo{i}"])
        print(f"InfiniteYou ArcFace embedding vs reference: max |diff| {diff:.2e}")
        assert mine.shape == (512,) and diff <= 1e-5
        # channel order is part of the recipe: the RGB crop gives another vector
        rgb = ours.embed_crop(emb.insightface_crop(photo, kps, 112))
        assert float(np.abs(rgb - theirs[f"photo{i}"]).max()) > 1e-3
        vectors.append(mine)
    assert float(np.abs(vectors[0] - vectors[1]).max()) > 1e-3


def test_infiniteyou_space_embeds_with_irse50(ctx, tiny_model, hopper):
    found = emb.embed_images(ctx, [("hopper", hopper)], INFINITEYOU, emb.EmbedPolicy(mode="best"))
    assert found.info()["space"] == "facexlib:arcface-irse50" and found.info()["normalized"] is True
    face = found.crops[0].face
    expected = emb.TorchArcFace(tiny_model).embed(hopper, face.kps)
    assert np.allclose(found.vectors[0], expected, rtol=0, atol=1e-6) and abs(float(np.linalg.norm(expected)) - 1) < 1e-5
    # the other spaces are unchanged: PuLID still embeds with antelopev2's glintr100
    pulid = emb.embed_images(ctx, [("hopper", hopper)], PULID, emb.EmbedPolicy(mode="best"))
    assert pulid.info()["space"] == "insightface:antelopev2" and pulid.dim == 512
    assert not np.allclose(emb.normalize(pulid.vectors[0]), found.vectors[0], atol=1e-2)
