"""`portrait generate` on the tiny preset: the lora and template backends, metadata, seeds,
LoRA composition, LCM and ControlNet modes, exit codes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _generate_helpers import write_tiny_identity
from portrait.core.formats.images import read_rgb
from portrait.core.errors import BadInput
from portrait.core.io import read_png_text, safetensors_data_sha256
from portrait.flows.generate import generate

NAME = "gen-alice"


@pytest.fixture(scope="module")
def identity(tiny_home, astronaut):
    write_tiny_identity(tiny_home, NAME, astronaut, seed=1)
    return NAME


@pytest.fixture(scope="module")
def warm(tiny_home):
    """One RunContext for the module, so pipelines stay warm between tests (like a batch run)."""
    from portrait.core.context import RunContext

    return RunContext.create(tiny_home, preset="tiny")


def _expected_versions() -> dict:
    """What every output records so it can be reproduced: the stack's versions, device, dtype."""
    from importlib.metadata import version

    import portrait

    return {"portrait": portrait.__version__, **{p: version(p) for p in ("torch", "diffusers", "transformers", "peft")},
            "device": "cpu", "dtype": "float32"}


def _pixels(path: Path) -> np.ndarray:
    return read_rgb(path)


def _params(path: Path) -> list[str]:
    return read_png_text(path)["parameters"].split("\n")


# --- lora backend ------------------------------------------------------------------------------


def test_lora_backend_writes_n_images_with_metadata(tiny_home, identity, warm, tmp_path):
    result = generate(identity, template="business", n=2, seed=11, out=tmp_path, ctx=warm, finish=False)
    assert [p.name for p in result.paths] == [f"{NAME}_business_11.png", f"{NAME}_business_12.png"]
    lora_hash = safetensors_data_sha256(tiny_home.identities_dir / NAME / "lora.safetensors")[:12]
    for path, seed in zip(result.paths, (11, 12)):
        assert Image.open(path).size == (64, 80)
        lines = _params(path)
        assert lines[0].startswith("professional business headshot photo of sks person")
        assert lines[0].endswith(f"<lora:{NAME}:0.9>")
        assert lines[1].startswith("Negative prompt: cartoon")
        last = lines[-1]
        assert last.startswith("Steps: 3, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, ")
        assert f"Seed: {seed}, Size: 64x80, " in last
        assert re.search(r"Model hash: [0-9a-f]{10}, Model: tiny-sd15, ", last)
        assert f'Lora hashes: "{NAME}: {lora_hash}"' in last
        assert last.endswith("Version: portrait 0.1")
        chunk = json.loads(read_png_text(path)["portrait"])
        assert chunk["request"]["seed"] == seed and chunk["request"]["backend"] == "lora"
        assert chunk["request"]["template"] == "business" and chunk["request"]["width"] == 64
        assert chunk["loras"][0]["hash"] == lora_hash
        assert chunk["versions"] == _expected_versions()
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["versions"] == _expected_versions()
    assert data["identity"] == NAME and data["backend"] == "lora" and data["template"] == "business"
    assert [r["rank"] for r in data["results"]] == [1, 2]
    for row in data["results"]:
        assert set(row) >= {"path", "seed", "rank", "similarity", "passed_gate", "timings"}
        assert (tmp_path / row["path"]).is_file() and row["timings"]["generate"] > 0


def test_same_seed_same_pixels_and_seed_k_is_image_k(identity, warm, tmp_path, monkeypatch):
    from portrait.stages.backends import lora as lora_backend

    batches = []
    real = lora_backend.call_pipeline_batch

    def spy(pipe, request, seeds, **kwargs):
        batches.append(list(seeds))
        return real(pipe, request, seeds, **kwargs)

    monkeypatch.setattr(lora_backend, "call_pipeline_batch", spy)
    a = generate(identity, template="business", n=3, seed=21, out=tmp_path / "a", ctx=warm, finish=False)
    assert batches == [[21, 22, 23]]  # one pipeline call rendered the three candidates
    singles = [generate(identity, template="business", n=1, seed=s, out=tmp_path / str(s), ctx=warm, finish=False)
               for s in (21, 22, 23)]
    assert batches == [[21, 22, 23]]  # n=1 takes the single-seed path
    again = generate(identity, template="business", n=1, seed=21, out=tmp_path / "again", ctx=warm, finish=False)
    assert np.array_equal(_pixels(singles[0].paths[0]), _pixels(again.paths[0]))  # a seed reproduces its image
    for batched, single in zip(a.paths, singles):
        # Batched convolutions sum in another order: equal within float tolerance, which can
        # move a pixel across a rounding boundary of the 8-bit output.
        diff = np.abs(_pixels(batched).astype(int) - _pixels(single.paths[0]).astype(int))
        assert diff.max() <= 1 and diff.mean() < 0.05, (diff.max(), diff.mean())
    assert not np.array_equal(_pixels(a.paths[0]), _pixels(a.paths[1]))


def test_batched_pipeline_call_equals_single_seed_calls_in_float(identity, warm):
    import torch

    from portrait.stages.sd import generator, load_sd_pipeline

    pipe = load_sd_pipeline(warm, "txt2img")
    common = dict(prompt="a photo of sks person", num_inference_steps=3, height=64, width=64, output_type="np")
    with torch.inference_mode():
        batched = pipe(**common, generator=[generator(s) for s in (4, 5)], num_images_per_prompt=2).images
        alone = [pipe(**common, generator=generator(s)).images[0] for s in (4, 5)]
    for b, a in zip(batched, alone):
        np.testing.assert_allclose(b, a, atol=1e-4)
    assert np.abs(batched[0] - batched[1]).max() > 1e-2


def test_candidate_batch_size_and_gate_seed_runs(identity, warm):
    import dataclasses

    from portrait.flows.generate import consecutive_runs
    from portrait.stages.sd import candidate_batch_size

    assert consecutive_runs([5, 6, 7, 9, 10, 3]) == [(5, 3), (9, 2), (3, 1)]
    request = _request(warm, n=6)
    assert 1 <= candidate_batch_size(warm, request) <= 6
    forced = dataclasses.replace(request, resolved=request.resolved.model_copy(update={"memory": {"batch": 4}}))
    assert candidate_batch_size(warm, forced) == 4
    assert candidate_batch_size(warm, dataclasses.replace(forced, n=2)) == 2
    with pytest.raises(BadInput, match="generate.memory.batch"):
        candidate_batch_size(warm, dataclasses.replace(
            request, resolved=request.resolved.model_copy(update={"memory": {"batch": 0}})))


def _request(ctx, n: int):
    from portrait.core.bundle import load_identity
    from portrait.stages.generate import GeneratePolicy, resolve_request
    from portrait.stages.templates import find_template

    identity = load_identity(ctx.settings, NAME)
    return resolve_request(identity, GeneratePolicy.from_preset(ctx.preset), template=find_template("business"),
                           prompt=None, backend="lora", seed=1, n=n, overrides={})


def test_identity_lora_weight_changes_the_image(identity, warm, tmp_path):
    on = generate(identity, template="film", n=1, seed=5, out=tmp_path / "on", ctx=warm, finish=False)
    off = generate(identity, template="film", n=1, seed=5, out=tmp_path / "off", ctx=warm, finish=False,
                   lora_weight=0.0)
    diff = np.abs(_pixels(on.paths[0]).astype(int) - _pixels(off.paths[0]).astype(int))
    assert diff.mean() > 1.0
    # and the LoRA was switched off again afterwards: a cached pipeline starts clean
    from peft.tuners.tuners_utils import BaseTunerLayer

    from portrait.stages.sd import load_sd_pipeline

    pipe = load_sd_pipeline(warm, "txt2img")  # the cached pipeline both calls used
    layers = [m for m in pipe.unet.modules() if isinstance(m, BaseTunerLayer)]
    assert layers and all(m.disable_adapters for m in layers)


def _style_template(tmp_path: Path, mode: str) -> Path:
    path = tmp_path / f"style-{mode}.yaml"
    path.write_text(f"name: painted-{mode}\nprompt: oil painting of {{trigger}} {{class}}\nsize: [512, 512]\n"
                    f"composition: {mode}\nstyle_lora: {{model: tiny-style-lora-sd15, weight: 0.8}}\n")
    return path


def test_style_lora_compositions_differ(identity, warm, tmp_path):
    images = {}
    for mode in ("merge", "switch", "composite"):
        r = generate(identity, template=str(_style_template(tmp_path, mode)), n=1, seed=3, out=tmp_path / mode,
                     ctx=warm, finish=False)
        images[mode] = _pixels(r.paths[0]).astype(int)
        info = r.results[0].candidate.info
        assert info["composition"] == mode
        assert [u["role"] for u in info["loras"]] == ["identity", "style"]
        assert "<lora:tiny-style-lora-sd15:0.8>" in _params(r.paths[0])[0]
    assert np.abs(images["merge"] - images["switch"]).mean() > 0.5
    assert np.abs(images["merge"] - images["composite"]).mean() > 0.5
    assert np.abs(images["switch"] - images["composite"]).mean() > 0.5


class _FakePipe:
    """Records which adapters are active; its UNet answers with the active adapter's number."""

    def __init__(self):
        self.active: list[str] = []
        self.enabled = True
        self.calls: list[tuple[str, ...]] = []
        pipe = self

        class Unet:
            def forward(self, x):
                from types import SimpleNamespace

                pipe.calls.append(tuple(pipe.active))
                return SimpleNamespace(sample=x * (10.0 if "style" in pipe.active else 1.0))

        self.unet = Unet()

    def set_adapters(self, names, adapter_weights=None):
        self.active = list(names)

    def enable_lora(self):
        self.enabled = True

    def disable_lora(self):
        self.enabled = False


def _uses():
    from portrait.stages.loras import AdapterUse

    return [AdapterUse("identity", Path("id.safetensors"), 0.9, "identity", "me"),
            AdapterUse("style", Path("style.safetensors"), 0.6, "style", "oil"),
            AdapterUse("lcm", Path("lcm.safetensors"), 1.0, "lcm", "lcm")]


def test_lora_switch_alternates_each_step_and_keeps_lcm():
    from portrait.stages.loras import composed

    pipe = _FakePipe()
    seen = []
    with composed(pipe, _uses(), "switch") as extra:
        seen.append(tuple(pipe.active))
        for step in range(4):
            extra["callback_on_step_end"](pipe, step, 999 - step, {})
            seen.append(tuple(pipe.active))
    assert seen == [("identity", "lcm"), ("style", "lcm"), ("identity", "lcm"), ("style", "lcm"), ("identity", "lcm")]
    assert pipe.enabled is False  # switched off after the call


def test_lora_composite_averages_one_prediction_per_lora():
    from portrait.stages.loras import composed

    pipe = _FakePipe()
    with composed(pipe, _uses(), "composite"):
        out = pipe.unet.forward(2.0)
    assert out.sample == pytest.approx((2.0 * 1.0 + 2.0 * 10.0) / 2)
    assert pipe.calls == [("identity", "lcm"), ("style", "lcm")]
    assert "forward" not in vars(pipe.unet)  # the wrapper is gone again


def test_lcm_fast_mode(identity, warm, tmp_path):
    r = generate(identity, template="fast-headshot", n=1, seed=2, out=tmp_path, ctx=warm, finish=False)
    info = r.results[0].candidate.info
    assert [u["role"] for u in info["loras"]] == ["identity", "lcm"]
    last = _params(r.paths[0])[-1]
    assert "Sampler: LCM" in last and "CFG scale: 1.5" in last
    assert "<lora:lcm-lora-sd15:1>" in _params(r.paths[0])[0]
    assert Image.open(r.paths[0]).size == (64, 64)


def test_pose_controlnet_from_template_image(identity, warm, tmp_path):
    r = generate(identity, template="astronaut", n=1, seed=4, out=tmp_path, ctx=warm, finish=False)
    info = r.results[0].candidate.info
    assert info["controls"] == {"openpose": {"strength": 0.7, "source": "landmarks"}}
    assert "ControlNet openpose: 0.7" in _params(r.paths[0])[-1]
    plain = generate(identity, template="astronaut", n=1, seed=4, out=tmp_path / "plain", ctx=warm, finish=False,
                     controls={"openpose": 0.0})
    assert not np.array_equal(_pixels(r.paths[0]), _pixels(plain.paths[0]))


def test_lora_backend_needs_a_lora(tiny_home, warm, tmp_path, astronaut):
    from portrait.core.bundle import identity_dir, write_bundle

    write_bundle(identity_dir(tiny_home, "gen-zero"), {"name": "gen-zero", "trigger": "sks", "class_word": "person"},
                 reference=astronaut)
    with pytest.raises(BadInput, match="no sd15 LoRA.*zero-shot"):
        generate("gen-zero", template="business", n=1, seed=1, out=tmp_path, ctx=warm, finish=False)


def test_lora_backend_on_sdxl(tiny_home, identity, astronaut, tmp_path):
    from portrait.core.context import RunContext

    write_tiny_identity(tiny_home, "gen-xl", astronaut, seed=3, family="sdxl", base_id="tiny-sdxl")
    xl = RunContext.create(tiny_home, preset="tiny-sdxl")
    r = generate("gen-xl", template="business", n=1, seed=1, out=tmp_path, ctx=xl, finish=False)
    assert Image.open(r.paths[0]).size == (64, 80)
    assert "Model: tiny-sdxl" in _params(r.paths[0])[-1] and "CFG scale: 7" in _params(r.paths[0])[-1]  # the template beats the preset
    with pytest.raises(BadInput, match="no sdxl LoRA"):
        generate(NAME, template="business", n=1, seed=1, out=tmp_path / "x", ctx=xl, finish=False)


def test_hopper_photo_template_on_tiny_sdxl(tiny_home, astronaut, tmp_path):
    """Both passes on SDXL: the preset's own tile ControlNet (xinsir's, tiny stand-in), the
    identity's SDXL LoRA, and the template untouched outside the face crop."""
    from portrait.core.context import RunContext
    from portrait.stages.controls import fit
    from portrait.stages import generate as gen
    from portrait.stages import templates

    write_tiny_identity(tiny_home, "gen-xl", astronaut, seed=3, family="sdxl", base_id="tiny-sdxl")
    xl = RunContext.create(tiny_home, preset="tiny-sdxl")
    assert xl.preset.model("controlnet_tile") == "controlnet-tile-sdxl"
    r = generate("gen-xl", template="hopper", n=1, seed=1, out=tmp_path, ctx=xl, finish=False)
    info = r.results[0].candidate.info
    assert r.backend == "template" and info["passes"]["count"] == 2 and info["model"]["name"] == "tiny-sdxl"
    assert [u["role"] for u in info["loras"]] == ["identity"]
    assert "ControlNet color: 0.85" in _params(r.paths[0])[-1]
    out = _pixels(r.paths[0])
    canvas = fit(read_rgb(templates.find_template("hopper").image), out.shape[1], out.shape[0])
    (face,) = info["faces"]
    x0, y0, x1, y1 = face["crop"]
    keep = np.ones(canvas.shape[:2], bool)
    keep[y0:y1, x0:x1] = False
    assert np.array_equal(out[keep], canvas[keep]) and not np.array_equal(out[~keep], canvas[~keep])


# --- template backend ----------------------------------------------------------------------------


def test_template_backend_two_passes_keep_everything_outside_the_masks(identity, warm, tmp_path):
    from portrait.core.bundle import load_identity
    from portrait.stages import generate as gen
    from portrait.stages import templates
    from portrait.stages.backends.template import TemplateBackend
    from portrait.stages.controls import fit

    template = templates.find_template("hopper")
    policy = gen.GeneratePolicy.from_preset(warm.preset)
    request = gen.resolve_request(load_identity(warm.settings, identity), policy, template=template, prompt=None,
                                  backend="template", n=1, seed=8)
    image, paints, info = TemplateBackend().render(request, warm, 8)
    assert image.shape == (request.height, request.width, 3) == (64, 56, 3)
    (paint,) = paints
    outside = paint.pass1_mask == 0
    assert outside.mean() > 0.3 and (~outside).mean() > 0.05
    # before pass 2: pixels outside the pass-1 mask are the template's, exactly
    assert np.array_equal(paint.pass1[outside], paint.crop[outside])
    assert not np.array_equal(paint.pass1[~outside], paint.crop[~outside])
    # pass 2 only repaints the ring around the face
    ring = paint.pass2_mask > 0
    assert ring.any() and not (ring & (paint.pass1_mask > 0) & (_eroded(paint.pass1_mask) > 0)).any()
    # outside the crop, the output is the template itself
    canvas = fit(read_rgb(template.image), request.width, request.height)
    x0, y0, x1, y1 = paint.box
    keep = np.ones(canvas.shape[:2], bool)
    keep[y0:y1, x0:x1] = False
    assert np.array_equal(image[keep], canvas[keep])
    (face,) = info["faces"]
    assert {k: face[k] for k in ("identity", "face", "crop")} == {"identity": identity, "face": 0, "crop": list(paint.box)}
    bx0, by0, bx1, by1 = face["box"]  # the painted face lies inside its crop
    assert x0 <= bx0 < bx1 <= x1 and y0 <= by0 < by1 <= y1
    assert info["template_faces"] == 1 and info["unassigned_faces"] == []
    assert info["loras"][0]["role"] == "identity"


def _eroded(mask: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.erode(mask.astype(np.uint8), np.ones((9, 9), np.uint8))


def test_template_backend_end_to_end_on_grace_hopper(identity, warm, tmp_path):
    result = generate(identity, template="hopper", n=1, seed=6, out=tmp_path, ctx=warm, finish=False)
    assert result.backend == "template"  # a photo template picks the template backend
    (path,) = result.paths
    assert Image.open(path).size == (56, 64)
    last = _params(path)[-1]
    assert "Denoising strength: 0.45" in last and "ControlNet canny: 0.5" in last and "ControlNet color: 0.85" in last
    again = generate(identity, template="hopper", n=1, seed=6, out=tmp_path / "again", ctx=warm, finish=False)
    assert np.array_equal(_pixels(path), _pixels(again.paths[0]))


def test_template_fusion_only_keeps_the_face_and_loads_no_pipeline(identity, ctx, tmp_path, hopper, astronaut):
    """passes=0: the reference face fused into the template, no diffusion. Measured with dlib,
    the new face is the identity's (the astronaut) and no longer Hopper's."""
    from portrait.core.faces import make_analyzer, similarity

    result = generate(identity, template="hopper", n=1, seed=6, out=tmp_path, ctx=ctx, width=256, height=296,
                      finish={"upscale": False, "retouch": False}, options={"passes": 0})
    loaded = [key.model_id for key in ctx.cache.keys()]
    assert loaded and not any("sd15" in m or "controlnet" in m for m in loaded), loaded  # no diffusion model
    info = result.results[0].candidate.info
    assert info["identity_mode"] == "fusion-only" and info["passes"]["count"] == 0
    # the A1111 chunk says what ran: fusion and its source, no sampler, steps, CFG, LoRA or ControlNet
    text = read_png_text(result.paths[0])["parameters"]
    for claim in ("Steps:", "Sampler:", "Schedule type:", "CFG scale:", "Lora hashes:", "<lora:", "ControlNet",
                  "Denoising strength:", "Model hash:"):
        assert claim not in text, (claim, text)
    assert "Fusion: reference face" in text and f"Fusion source: {NAME}/reference.png" in text, text
    assert info["loras"] == [] and "Seed: 6" in text
    dlib = make_analyzer(ctx, "dlib")
    (face,) = dlib.detect(_pixels(result.paths[0]))
    astro, grace = dlib.detect(astronaut)[0].embedding, dlib.detect(hopper)[0].embedding
    assert similarity(face.embedding, astro, "dlib") > 0.5 > similarity(face.embedding, grace, "dlib")
    with pytest.raises(BadInput, match="--option passes: input should be 0, 1 or 2"):
        generate(identity, template="hopper", n=1, seed=6, out=tmp_path / "bad", ctx=ctx, options={"passes": 3})


def test_template_backend_can_carry_faceid_in_its_passes(identity, warm, tmp_path):
    plain = generate(identity, template="hopper", n=1, seed=6, out=tmp_path / "plain", ctx=warm, finish=False)
    with_faceid = generate(identity, template="hopper", n=1, seed=6, out=tmp_path / "faceid", ctx=warm, finish=False,
                           options={"identity_adapter": "faceid"})
    info = with_faceid.results[0].candidate.info
    assert info["identity_mode"] == "lora+faceid"
    assert not np.array_equal(_pixels(plain.paths[0]), _pixels(with_faceid.paths[0]))
    # the adapter is detached afterwards: the shared pipeline renders the plain result again
    again = generate(identity, template="hopper", n=1, seed=6, out=tmp_path / "again", ctx=warm, finish=False)
    assert np.array_equal(_pixels(plain.paths[0]), _pixels(again.paths[0]))
    with pytest.raises(BadInput, match="--option identity_adapter: input should be 'faceid'"):
        generate(identity, template="hopper", n=1, seed=6, out=tmp_path / "bad", ctx=warm, finish=False,
                 options={"identity_adapter": "instantid"})


def test_template_backend_fast_mode_adds_lcm(identity, warm, tmp_path):
    r = generate(identity, template="hopper", n=1, seed=2, out=tmp_path, ctx=warm, finish=False, fast="lcm",
                 scheduler="lcm", guidance=1.5)
    info = r.results[0].candidate.info
    assert [u["role"] for u in info["loras"]] == ["identity", "lcm"]
    assert "Sampler: LCM" in _params(r.paths[0])[-1]


def test_template_with_fewer_faces_than_identities(tiny_home, identity, warm, tmp_path, astronaut):
    write_tiny_identity(tiny_home, "gen-bob", astronaut[:, ::-1].copy(), seed=2)
    with pytest.raises(BadInput, match="template hopper: it has 1 face.*2 identities"):
        generate(identity, template="hopper", n=1, seed=1, out=tmp_path, ctx=warm, finish=False,
                 options={"identities": ["gen-bob"]})


def test_group_template_assigns_left_to_right_and_protects_others(tiny_home, identity, warm, tmp_path, t1_group,
                                                                  astronaut):
    write_tiny_identity(tiny_home, "gen-bob", astronaut[:, ::-1].copy(), seed=2)
    folder = tmp_path / "group"
    folder.mkdir()
    Image.fromarray(t1_group).save(folder / "group.png")
    (folder / "template.yaml").write_text("image: group.png\nprompt: group photo of {trigger} {class}\n")
    r = generate(identity, template=str(folder), n=1, seed=1, out=tmp_path / "out", ctx=warm, finish=False,
                 width=256, height=168, options={"identities": ["gen-bob"], "crop_size": 64})
    faces = r.results[0].candidate.info["faces"]
    assert [(f["identity"], f["face"]) for f in faces] == [(identity, 0), ("gen-bob", 1)]
    assert faces[0]["crop"][0] < faces[1]["crop"][0]
    from portrait.stages.controls import fit

    canvas = fit(t1_group, 256, 168)
    out = _pixels(r.paths[0])
    touched = np.zeros(canvas.shape[:2], bool)
    for f in faces:
        x0, y0, x1, y1 = f["crop"]
        touched[y0:y1, x0:x1] = True
    assert np.array_equal(out[~touched], canvas[~touched])
    assert not np.array_equal(out[touched], canvas[touched])


# --- finishing and the CLI ------------------------------------------------------------------------


def _cli(args: list[str], home: Path, capsys) -> tuple[int, str]:
    from portrait.cli.main import run

    code = run(["--home", str(home), "--preset", "tiny", "--device", "cpu", *args])
    captured = capsys.readouterr()
    return code, captured.err.strip()


def test_cli_generate_with_finish_writes_ranked_results(tiny_home, identity, tmp_path, capsys):
    code, err = _cli(["generate", "--identity", identity, "--template", "studio-bw", "--n", "1", "--seed", "9",
                      "--out", str(tmp_path)], tiny_home.home, capsys)
    assert code == 0, err
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["finish"]["upscale"] is True and "gate" in data
    row = data["results"][0]
    assert row["rank"] == 1 and isinstance(row["passed_gate"], bool)
    # measured where a face was found; null (not 0.0) where none was: the tiny models paint noise
    assert isinstance(row["similarity"], float) if row["faces"] else row["similarity"] is None
    assert {"generate", "score"} <= set(row["timings"])
    assert (tmp_path / row["path"]).is_file() and (tmp_path / "contact_sheet.png").is_file()
    assert "Steps: 3" in read_png_text(tmp_path / row["path"])["parameters"]
    # the memory plan was made with the finishing models in it (before any of them loaded)
    planned = {p["name"]: p for p in data["memory_plan"]["parts"]}
    assert planned["finish:realesrgan-x2plus"]["role"] == "finish"


def test_cli_bad_inputs_exit_2_with_one_line(tiny_home, identity, tmp_path, capsys):
    code, err = _cli(["generate", "--identity", "nobody", "--template", "business", "--out", str(tmp_path)],
                     tiny_home.home, capsys)
    assert code == 2 and "identity 'nobody' does not exist" in err and len(err.splitlines()) == 1
    code, err = _cli(["generate", "--identity", identity, "--template", "nope", "--out", str(tmp_path)],
                     tiny_home.home, capsys)
    assert code == 2 and "unknown template 'nope'" in err and len(err.splitlines()) == 1
    faceless = tmp_path / "faceless"
    faceless.mkdir()
    from skimage import data

    Image.fromarray(data.coffee()).save(faceless / "coffee.jpg")
    (faceless / "template.yaml").write_text("image: coffee.jpg\nprompt: portrait of {trigger}\n")
    code, err = _cli(["generate", "--identity", identity, "--template", str(faceless), "--n", "1", "--out",
                      str(tmp_path / "o")], tiny_home.home, capsys)
    assert code == 2 and "template faceless: no face found" in err and len(err.splitlines()) == 1
    code, err = _cli(["generate", "--identity", identity, "--prompt", "x", "--size", "65x64", "--out",
                      str(tmp_path / "o")], tiny_home.home, capsys)
    assert code == 2 and "multiples of 8" in err


def test_cli_missing_real_model_exits_3_naming_the_download(tiny_home, identity, tmp_path, capsys):
    from portrait.cli.main import run

    code = run(["--home", str(tiny_home.home), "--preset", "sd15", "--device", "cpu", "generate", "--identity",
                identity, "--template", "business", "--n", "1", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 3 and "portrait models download sd15" in err


def test_memory_offload_option_forces_the_plans_strategy():
    """generate.memory.offload is read by the memory plan (auto lets it choose; tests/test_memplan.py)."""
    from portrait.core.errors import BadInput
    from portrait.stages.planning import offload_setting

    assert offload_setting("auto") == "auto"
    assert offload_setting(True) == offload_setting("true") == "model"
    assert offload_setting(False) == "resident"
    assert offload_setting("group") == "group" and offload_setting("sequential") == "sequential"
    with pytest.raises(BadInput, match="generate.memory.offload"):
        offload_setting("sometimes")
