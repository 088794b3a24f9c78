"""FLUX family (tiny-flux) and the InfiniteYou backend.

The oracle is ByteDance's own code: its `pipelines/pipeline_flux_infusenet.py` and
`pipelines/resampler.py`, run by `scripts/reference_fixtures.py` from the fetched repository (a
bare git mirror, never vendored) on our tiny weights; what they computed is stored in
tests/fixtures/reference/ and every run compares against it (tests/reference_fixtures.py). Its
pipeline imports `diffusers.models.controlnet_flux`, which diffusers 0.42 moved to
`diffusers.models.controlnets.controlnet_flux`: recording aliases the module name, nothing else.
Measured differences are printed (`pytest -s`) and bounded by the assertions.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from portrait.core.context import RunContext
from portrait.core.errors import BadInput
from portrait.stages.generate import GeneratePolicy, generate_candidates, resolve_request
from portrait.stages.metadata import image_metadata

from reference_fixtures import max_diff, mirror, reference
from test_embed import make_identity

SIZE = 64
STEPS = 2


@pytest.fixture(scope="module")
def ctx(tiny_home):
    return RunContext.create(tiny_home, preset="tiny-flux")


@pytest.fixture(scope="module")
def person(tiny_home, hopper, astronaut):
    return make_identity(tiny_home, "flux-person", [hopper, astronaut], reference=hopper)


def request_for(ctx, identity, backend, seed=5, prompt="portrait photo of a woman, studio light", **options):
    policy = GeneratePolicy.from_preset(ctx.preset)
    overrides = {"width": SIZE, "height": SIZE, "steps": STEPS, "options": options}
    return resolve_request(identity, policy, template=None, prompt=prompt, backend=backend, n=1, seed=seed,
                           overrides=overrides)


def run(ctx, request):
    return list(generate_candidates(request, ctx))


def reference_module(name: str, tmp_path_factory):
    """One file of InfiniteYou's repo, written out of the git mirror and imported by path (recording only)."""
    text = subprocess.run(["git", f"--git-dir={mirror('bytedance+InfiniteYou')}", "show", f"HEAD:pipelines/{name}.py"],
                          capture_output=True, text=True, check=True).stdout
    folder = tmp_path_factory.mktemp("infiniteyou-ref")
    path = folder / f"{name}.py"
    path.write_text(text)
    import diffusers.models.controlnets.controlnet_flux as moved

    sys.modules.setdefault("diffusers.models.controlnet_flux", moved)
    spec = importlib.util.spec_from_file_location(f"infiniteyou_ref_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- the FLUX base family -------------------------------------------------------------------


def test_tiny_flux_generates_with_flux_metadata(ctx, person):
    req = request_for(ctx, person, None)
    assert req.backend == "flux" and req.scheduler == "flow_euler" and req.guidance == 3.5
    candidate = run(ctx, req)[0]
    assert candidate.image.shape == (SIZE, SIZE, 3) and candidate.image.std() > 1.0
    assert candidate.info["identity_mode"] == "none"
    chunks = image_metadata(candidate, model_name="tiny-flux", model_hash10=None)
    params = chunks["parameters"].splitlines()[-1]
    assert "Sampler: Euler" in params and "Schedule type: Simple" in params
    assert "CFG scale: 1," in params and "Distilled CFG Scale: 3.5" in params and "Steps: 2" in params


def test_flux_refuses_an_sd_sampler(ctx, person):
    policy = GeneratePolicy.from_preset(ctx.preset)
    req = resolve_request(person, policy, template=None, prompt="x", backend="flux", n=1, seed=1,
                          overrides={"width": SIZE, "height": SIZE, "steps": 1, "scheduler": "euler"})
    with pytest.raises(BadInput, match="flow_euler"):
        run(ctx, req)


def test_int8_quantized_transformer_runs_and_stays_close(tiny_home, person):
    """runtime.quantize int8 (optimum-quanto qint8) loads the same folder into 8-bit weights."""
    from optimum.quanto import QLinear

    from portrait.core.config import load_preset
    from portrait.core.loaders import load_components, quantize_flux

    ctx = RunContext.create(tiny_home, preset="tiny-flux")
    base = load_components(ctx)
    modules = dict(base.modules)
    import copy

    modules["transformer"] = copy.deepcopy(base["transformer"])
    modules["text_encoder_2"] = copy.deepcopy(base["text_encoder_2"])
    quantize_flux(modules, "int8")
    assert any(isinstance(m, QLinear) for m in modules["transformer"].modules())
    assert not any(isinstance(m, QLinear) for m in base["transformer"].modules())
    x = torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(0))
    kwargs = dict(hidden_states=x, timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]),
                  pooled_projections=torch.zeros(1, 32), encoder_hidden_states=torch.randn(1, 4, 32),
                  txt_ids=torch.zeros(4, 3), img_ids=torch.zeros(16, 3), return_dict=False)
    with torch.no_grad():
        full = base["transformer"](**kwargs)[0]
        q8 = modules["transformer"](**kwargs)[0]
    rel = float((full - q8).abs().max() / full.abs().max())
    print(f"int8 transformer: max relative difference {rel:.4f}")
    assert 0 < rel < 0.1
    with pytest.raises(BadInput, match="runtime.quantize"):
        quantize_flux(dict(base.modules), "int3")
    assert load_preset("flux").section("runtime").get("quantize", "none") == "none"


# --- InfiniteYou -------------------------------------------------------------------------------


def test_projection_matches_the_reference_resampler(ctx, tmp_path_factory):
    """Our IdProjection and InfiniteYou's Resampler, same tiny weights, same embedding."""
    from portrait.core.archs import infiniteyou as arch
    from portrait.core.tiny.flux import id_projection_state

    state = id_projection_state(11)
    ours = arch.build(state)
    emb = torch.randn(2, 3, 512, generator=torch.Generator().manual_seed(2))

    def resampler():
        ref = reference_module("resampler", tmp_path_factory).Resampler(**arch.sizes(state, 64)).eval()
        ref.load_state_dict(state)
        with torch.no_grad():
            return {"tokens": ref(emb)}

    theirs = reference("infiniteyou_resampler", resampler)
    with torch.no_grad():
        a = ours(emb)
    diff = max_diff(a, theirs["tokens"])
    print(f"projection vs reference Resampler: max |diff| {diff:.2e}")
    assert a.shape == (2, 8, 32) and diff <= 1e-5
    assert arch.detect(state) and not arch.detect({"proj.0.weight": 0})


def plain_loop(ctx, person, seed=5, **options):
    """InfiniteYou's own loop with the InfuseNet's residuals left out: the plain FLUX transformer
    from the same start (InfiniteYou draws the control image's VAE sample before the noise, as its
    entry point does, so the `flux` backend's image for the seed starts from other noise)."""
    from portrait.stages import flux
    from portrait.stages.backends import infiniteyou as iy

    class NoInfuseNet:
        config = type("Config", (), {"guidance_embeds": True})

        def __call__(self, **kwargs):
            return None, None

    req = request_for(ctx, person, "infiniteyou", seed=seed, **options)
    pipe = flux.load_flux_pipeline(ctx, req)
    tokens = torch.zeros(1, 8, 32)
    with torch.inference_mode():
        image = iy.denoise(pipe, NoInfuseNet(), tokens, prompt=req.prompt, width=SIZE, height=SIZE, steps=STEPS,
                           guidance=req.guidance, seed=seed, control=np.zeros((SIZE, SIZE, 3), np.uint8),
                           max_sequence_length=flux.max_sequence_length(ctx))
    from portrait.stages.sd import to_uint8

    return to_uint8(image)


def test_scale_zero_is_exactly_plain_flux(ctx, person):
    ours = run(ctx, request_for(ctx, person, "infiniteyou", infusenet_conditioning_scale=0.0))[0].image
    plain = plain_loop(ctx, person)
    with_id = run(ctx, request_for(ctx, person, "infiniteyou"))[0]
    assert np.array_equal(ours, plain)
    assert int(np.abs(with_id.image.astype(int) - plain.astype(int)).max()) > 0
    assert with_id.info["adapter"]["variant"] == "aes_stage2" and with_id.info["adapter"]["id_tokens"] == 8
    assert with_id.info["embedding"]["normalized"] is True


def test_guidance_window_and_variant_change_the_image(ctx, person):
    full = run(ctx, request_for(ctx, person, "infiniteyou"))[0].image
    late = run(ctx, request_for(ctx, person, "infiniteyou", infusenet_guidance_start=0.5))[0].image
    none = run(ctx, request_for(ctx, person, "infiniteyou", infusenet_guidance_start=0.6,
                                infusenet_guidance_end=0.6))[0].image
    plain = plain_loop(ctx, person)
    sim = run(ctx, request_for(ctx, person, "infiniteyou", infiniteyou_variant="sim_stage1"))[0].image
    assert not np.array_equal(full, late) and not np.array_equal(late, plain)
    assert np.array_equal(none, plain)  # a window holding no step of the 2 is the plain loop
    assert not np.array_equal(full, sim)


def test_several_photos_mean_differs_from_best(ctx, person):
    mean = run(ctx, request_for(ctx, person, "infiniteyou", id_mode="mean"))[0]
    best = run(ctx, request_for(ctx, person, "infiniteyou", id_mode="best"))[0]
    assert len(mean.info["embedding"]["photos"]) == 2
    assert not np.array_equal(mean.image, best.image)


def test_bad_options_are_refused(ctx, person):
    with pytest.raises(BadInput, match="infiniteyou_variant"):
        request_for(ctx, person, "infiniteyou", infiniteyou_variant="v2")
    with pytest.raises(BadInput, match="infusenet_guidance_start"):
        run(ctx, request_for(ctx, person, "infiniteyou", infusenet_guidance_start=0.8, infusenet_guidance_end=0.2))
    sd_ctx = RunContext.create(ctx.settings, preset="tiny")
    with pytest.raises(BadInput, match="flux"):
        policy = GeneratePolicy.from_preset(sd_ctx.preset)
        req = resolve_request(person, policy, template=None, prompt="x", backend="infiniteyou", n=1, seed=1,
                              overrides={"width": SIZE, "height": SIZE, "steps": 1})
        run(sd_ctx, req)


def test_matches_infiniteyou_reference_pipeline(ctx, person, hopper, tmp_path_factory):
    """Same tiny weights, seed, prompt, tokens and control image through InfiniteYou's
    FluxInfuseNetPipeline called as its entry point calls it (`seed_everything(seed)`, no
    generator: the control image's VAE sample, then the noise, from the global RNG) and our
    denoise(): packed latents within 1e-4. The order matters: drawing the noise from a fresh
    generator (as the backend did before) gives another image."""
    from PIL import Image

    from portrait.stages import embed as emb
    from portrait.stages import flux
    from portrait.stages.backends import infiniteyou as iy
    from portrait.stages.keypoints import draw_kps

    cases = (("aes_stage2", 1.0, 0.0, 1.0, False), ("sim_stage1", 0.7, 0.0, 0.5, True))
    found = emb.embed_identity(ctx, person, iy.FACE_SPACE, emb.EmbedPolicy())
    setups = []
    for variant, scale, start, end, with_pose in cases:
        req = request_for(ctx, person, "infiniteyou", seed=9, infiniteyou_variant=variant)
        models = iy.load_models(ctx, iy.InfiniteYouPolicy(variant=variant, scale=scale, start=start, end=end))
        control = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
        if with_pose:
            control = draw_kps(SIZE, SIZE, np.array([[20, 26], [44, 26], [32, 36], [24, 48], [40, 48]], np.float32))
        setups.append((req, models, iy.id_tokens(models.projection, found.vectors), control))
    pipe = flux.load_flux_pipeline(ctx, setups[0][0])
    msl = flux.max_sequence_length(ctx)

    def infiniteyou():
        ref = reference_module("pipeline_flux_infusenet", tmp_path_factory)
        out = {}
        for i, ((variant, scale, start, end, _), (req, models, tokens, control)) in enumerate(zip(cases, setups)):
            pipeline = ref.FluxInfuseNetPipeline(
                scheduler=pipe.scheduler.__class__.from_config(pipe.scheduler.config), vae=pipe.vae,
                text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, text_encoder_2=pipe.text_encoder_2,
                tokenizer_2=pipe.tokenizer_2, transformer=pipe.transformer, controlnet=models.infusenet)
            pipeline.set_progress_bar_config(disable=True)
            torch.manual_seed(9)  # InfiniteYou's seed_everything(seed); its __call__ passes no generator
            with torch.inference_mode():
                out[f"latents{i}"] = pipeline(
                    prompt=req.prompt, controlnet_prompt_embeds=tokens, control_image=Image.fromarray(control),
                    guidance_scale=3.5, num_inference_steps=STEPS + 1, controlnet_guidance_scale=1.0,
                    controlnet_conditioning_scale=scale, control_guidance_start=start, control_guidance_end=end,
                    height=SIZE, width=SIZE, max_sequence_length=msl, output_type="latent").images
            out[f"tokens{i}"] = tokens
        return out

    theirs = reference("infiniteyou_pipeline", infiniteyou)
    for i, ((variant, scale, start, end, with_pose), (req, models, tokens, control)) in enumerate(zip(cases, setups)):
        assert max_diff(tokens, theirs[f"tokens{i}"]) <= 1e-4  # our projection still makes the recorded tokens
        kwargs = dict(prompt=req.prompt, width=SIZE, height=SIZE, steps=STEPS + 1, guidance=3.5, seed=9, control=control,
                      scale=scale, start=start, end=end, max_sequence_length=msl, output_type="latent")
        with torch.inference_mode():
            ours = iy.denoise(pipe, models.infusenet, torch.from_numpy(theirs[f"tokens{i}"]), **kwargs)
        diff = max_diff(ours, theirs[f"latents{i}"])
        print(f"InfiniteYou {variant} scale {scale} window [{start}, {end}] pose {with_pose}: "
              f"max |latent diff| vs reference {diff:.2e} (latent scale {float(np.abs(theirs[f'latents{i}']).max()):.2f})")
        assert diff <= 1e-4
    # the same latents with the noise drawn from a fresh generator (not after the VAE sample) differ
    req, models, _, control = setups[0]
    cls = type(pipe)
    original = cls.prepare_latents

    def fresh_noise(self, *args):
        return original(self, *args[:-1], torch.Generator().manual_seed(9))

    cls.prepare_latents = fresh_noise
    try:
        with torch.inference_mode():
            other = iy.denoise(pipe, models.infusenet, torch.from_numpy(theirs["tokens0"]), prompt=req.prompt, width=SIZE,
                               height=SIZE, steps=STEPS + 1, guidance=3.5, seed=9, control=control,
                               max_sequence_length=msl, output_type="latent")
    finally:
        cls.prepare_latents = original
    assert max_diff(other, theirs["latents0"]) > 1e-2


def test_style_template_on_flux_uses_flow_sampler_and_distilled_guidance(ctx, person):
    """Style templates name SD samplers and CFG scales; on a FLUX preset the preset's apply."""
    from portrait.stages.templates import find_template

    policy = GeneratePolicy.from_preset(ctx.preset)
    template = find_template("business", "style")
    assert template.scheduler and template.scheduler != "flow_euler"
    req = resolve_request(person, policy, template=template, prompt=None, backend="infiniteyou", n=1, seed=1,
                          overrides={"width": SIZE, "height": SIZE, "steps": 1})
    assert req.scheduler == "flow_euler" and req.guidance == 3.5
    assert run(ctx, req)[0].image.shape == (SIZE, SIZE, 3)


def test_python_api_runs_infiniteyou_with_the_finish(ctx, person, tmp_path):
    """portrait.generate on tiny-flux: fusion, scoring and the gate behind InfiniteYou, the
    A1111 chunk with FLUX's parameters, results.json."""
    import json

    from PIL import Image

    import portrait

    result = portrait.generate(person.name, prompt="portrait photo of a woman", backend="infiniteyou", n=2, seed=4,
                               out=tmp_path / "out", ctx=ctx, width=SIZE, height=SIZE, steps=STEPS,
                               options={"infusenet_conditioning_scale": 0.8})
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert data["backend"] == "infiniteyou" and len(data["results"]) == 2
    assert [r["seed"] for r in sorted(data["results"], key=lambda r: r["seed"])] == [4, 5]
    first = data["results"][0]
    assert {"similarity", "passed_gate", "rank"} <= set(first)
    text = Image.open(tmp_path / "out" / Path(first["path"]).name).text["parameters"]
    assert "Distilled CFG Scale: 3.5" in text and "Sampler: Euler" in text
    assert len(result.results) == 2


def test_int8_preset_runs_infiniteyou_end_to_end(tiny_home, person, tmp_path):
    """A preset extending tiny-flux with runtime.quantize int8: transformer, T5 and InfuseNet
    load 8-bit (optimum-quanto) and InfiniteYou still generates."""
    from optimum.quanto import QLinear

    preset = tmp_path / "flux-int8.yaml"
    preset.write_text("extends: tiny-flux\nruntime: {quantize: int8}\n")
    ctx8 = RunContext.create(tiny_home, preset=str(preset))
    candidate = run(ctx8, request_for(ctx8, person, "infiniteyou"))[0]
    assert candidate.image.shape == (SIZE, SIZE, 3)
    from portrait.core.loaders import load_components
    from portrait.stages.backends.infiniteyou import InfiniteYouPolicy, load_models

    components = load_components(ctx8)
    for module in (components["transformer"], components["text_encoder_2"], load_models(ctx8, InfiniteYouPolicy()).infusenet):
        assert any(isinstance(m, QLinear) for m in module.modules())


def test_flow_sampler_is_refused_on_sd(tiny_home, person):
    sd = RunContext.create(tiny_home, preset="tiny")
    policy = GeneratePolicy.from_preset(sd.preset)
    req = resolve_request(person, policy, template=None, prompt="x", backend="faceid", n=1, seed=1,
                          overrides={"width": SIZE, "height": SIZE, "steps": 1, "scheduler": "flow_euler"})
    with pytest.raises(BadInput, match="flow_euler: a sampler for flux"):
        run(sd, req)
