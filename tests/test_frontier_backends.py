"""The frontier backends against diffusers' own pipelines on the same tiny weights and seed.

For each of klein-ref, qwen-edit and zimage, the oracle is the diffusers pipeline class the
model's hub folder names (Flux2KleinPipeline, QwenImageEditPlusPipeline, ZImagePipeline),
loaded on its own with `from_pretrained` from the stand-in folder, called with arguments the
test builds by hand from the bundle's files (the prompt as the template reads plus the
reference instruction, the reference pictures read from the bundle, a CPU generator of the
seed). Ours is the backend's pipeline from the model door and the backend's own arguments.
Both return latents (`output_type="latent"`); the maximum absolute difference must be
<= 1e-4, and a changed transformer weight (or a changed reference picture) must move them.
The end-to-end candidate image equals the oracle's decoded image within one 8-bit level.
Figures are printed (`pytest -s`).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from portrait.core.context import RunContext
from portrait.core.errors import BadInput
from portrait.stages.generate import GeneratePolicy, generate_candidates, resolve_request

from test_embed import make_identity

SIZE = 64
STEPS = 2
PROMPT = "portrait photo of {trigger} {class}, studio light"
FILLED = "portrait photo of sks woman, studio light"


@pytest.fixture(scope="module")
def person(tiny_home, hopper, astronaut):
    return make_identity(tiny_home, "frontier-person", [hopper, astronaut], reference=hopper)


def request_for(ctx, identity, backend, seed=7, **options):
    policy = GeneratePolicy.from_preset(ctx.preset)
    return resolve_request(identity, policy, template=None, prompt=PROMPT, backend=backend, n=1, seed=seed,
                           overrides={"width": SIZE, "height": SIZE, "steps": STEPS, "options": options})


def oracle(cls, ctx):
    """diffusers' pipeline class, loaded by diffusers itself from the stand-in folder."""
    folder = ctx.resolve(ctx.preset.model("base")).root
    pipe = cls.from_pretrained(str(folder), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def latents(pipe, **args):
    with torch.inference_mode():
        return pipe(**args, output_type="latent").images.float()


def bundle_pictures(identity, count):
    """What the backend should show: reference.png, then the aligned crop of the next photo
    (the first photo is the reference file itself here), both at the output's side."""
    from portrait.core.formats.images import read_rgb

    first = Image.fromarray(read_rgb(identity.reference)).resize((SIZE, SIZE), Image.LANCZOS)
    return [first][:count]


def report(name, diff, moved, extra=""):
    print(f"{name}: max |latent diff| vs diffusers {diff:.2e}; changed weight moves it by {moved:.2e}{extra}")


def perturbed(pipe):
    """A copy of the oracle's transformer with one weight changed: the output projection of
    the first attention block gets seeded noise of std 0.05 added (the projections before it
    are followed by QK norms, which would absorb a small change)."""
    import copy

    transformer = copy.deepcopy(pipe.transformer)
    name, weight = next((n, p) for n, p in transformer.named_parameters()
                        if p.ndim == 2 and ("to_out" in n or "attention.out" in n))
    with torch.no_grad():
        weight.add_(0.05 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)))
    return transformer


# --- klein-ref --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def klein_ctx(tiny_home):
    return RunContext.create(tiny_home, preset="tiny-flux2-klein")


def test_klein_ref_matches_flux2_klein_pipeline(klein_ctx, person):
    from diffusers import Flux2KleinPipeline

    from portrait.stages import frontier, references
    from portrait.stages.backends import klein_ref

    req = request_for(klein_ctx, person, "klein-ref", references=1)
    assert req.prompt == FILLED
    pictures = references.identity_references(klein_ctx, person, 1, SIZE, "dlib")
    prompt = frontier.reference_prompt(req.prompt, klein_ref.INSTRUCTION, 1)
    assert prompt == FILLED + ". Keep the face and identity of the person in the reference image exactly."
    ours_pipe = frontier.load_frontier_pipeline(klein_ctx, req, "edit")
    ours = frontier.call(ours_pipe, {**klein_ref.pipeline_args(klein_ctx, req, prompt, pictures, 7),
                                     "output_type": "latent"}).float()
    ref = oracle(Flux2KleinPipeline, klein_ctx)
    assert ref.config.is_distilled is True
    args = dict(prompt=prompt, image=bundle_pictures(person, 1), height=SIZE, width=SIZE, num_inference_steps=STEPS,
                guidance_scale=1.0, max_sequence_length=512, generator=torch.Generator("cpu").manual_seed(7))
    theirs = latents(ref, **args)
    diff = float((ours - theirs).abs().max())
    ref.transformer = perturbed(ref)
    moved = float((latents(ref, **{**args, "generator": torch.Generator("cpu").manual_seed(7)}) - theirs).abs().max())
    other = Image.fromarray(np.asarray(args["image"][0])[::-1].copy())
    ref.transformer = ours_pipe.transformer
    moved_ref = float((latents(ref, **{**args, "image": [other], "generator": torch.Generator("cpu").manual_seed(7)})
                       - theirs).abs().max())
    report("klein-ref", diff, moved, f"; a flipped reference picture moves it by {moved_ref:.2e}")
    assert ours.shape == theirs.shape and diff <= 1e-4
    assert moved > 1e-3 and moved_ref > 1e-3
    # the whole backend: the candidate equals the oracle's image
    candidate = list(generate_candidates(req, klein_ctx))[0]
    with torch.inference_mode():
        image = ref(**{**args, "generator": torch.Generator("cpu").manual_seed(7)}, output_type="np").images[0]
    pixels = int(np.abs(candidate.image.astype(int) - np.round(np.clip(image, 0, 1) * 255).astype(int)).max())
    assert pixels <= 1, pixels
    assert candidate.info["identity_mode"] == "reference" and candidate.info["references"][0]["file"] == "reference.png"
    assert candidate.info["prompt_sent"] == prompt


def test_klein_ref_shows_the_aligned_crops_best_first_without_repeats(klein_ctx, person):
    candidate = list(generate_candidates(request_for(klein_ctx, person, "klein-ref", references=3), klein_ctx))[0]
    files = [r["file"] for r in candidate.info["references"]]
    # photo 000 is the reference file itself: skipped; the astronaut is cropped around her face
    assert files == ["reference.png", "photos/001.png"]
    assert len({r["sha256"] for r in candidate.info["references"]}) == 2


def test_klein_base_runs_real_cfg(tiny_home, person, tmp_path):
    own = tmp_path / "klein-base.yaml"  # a user's preset: the base 4B stand-in, CFG 4
    own.write_text("extends: tiny-flux2-klein\nmodels: {base: flux2-klein-base-4b}\ngenerate: {guidance: 4.0}\n")
    ctx = RunContext.create(tiny_home, preset="tiny-flux2-klein")
    base = RunContext.create(tiny_home, preset=str(own))
    distilled = list(generate_candidates(request_for(ctx, person, "klein-ref", references=1), ctx))[0]
    undistilled = list(generate_candidates(request_for(base, person, "klein-ref", references=1), base))[0]
    assert distilled.request.guidance == 1.0 and undistilled.request.guidance == 4.0
    assert distilled.info["distilled"] is True and undistilled.info["distilled"] is False
    assert not np.array_equal(distilled.image, undistilled.image)


def test_a_klein_lora_in_the_bundle_is_applied(klein_ctx, person, tmp_path, tiny_home, hopper, astronaut):
    from diffusers import Flux2KleinPipeline

    from portrait.core.bundle import load_identity, update_manifest

    who = make_identity(tiny_home, "frontier-lora", [hopper, astronaut], reference=hopper)
    pipe = oracle(Flux2KleinPipeline, klein_ctx)
    generator = torch.Generator().manual_seed(0)
    state = {}
    for name, module in pipe.transformer.named_modules():
        if name.endswith(("attn.to_q", "attn.to_k", "attn.to_v")):
            state[f"{name}.lora_A.weight"] = torch.randn(4, module.in_features, generator=generator) * 0.2
            state[f"{name}.lora_B.weight"] = torch.randn(module.out_features, 4, generator=generator) * 0.2
    Flux2KleinPipeline.save_lora_weights(str(who.root), transformer_lora_layers=state, weight_name="lora_klein.safetensors")
    update_manifest(who.root, loras={"flux2-klein": {"file": "lora_klein.safetensors", "rank": 4, "alpha": 4}})
    who = load_identity(tiny_home, "frontier-lora")
    with_lora = list(generate_candidates(request_for(klein_ctx, who, "klein-ref", references=1), klein_ctx))[0]
    plain = list(generate_candidates(request_for(klein_ctx, person, "klein-ref", references=1), klein_ctx))[0]
    assert with_lora.info["identity_mode"] == "reference+lora" and with_lora.info["loras"][0]["role"] == "identity"
    assert not np.array_equal(with_lora.image, plain.image)
    # the LoRA is switched off after the call: the shared pipeline renders the plain image again
    again = list(generate_candidates(request_for(klein_ctx, person, "klein-ref", references=1), klein_ctx))[0]
    assert np.array_equal(again.image, plain.image)


# --- qwen-edit --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen_ctx(tiny_home):
    return RunContext.create(tiny_home, preset="tiny-qwen-edit")


def test_qwen_edit_matches_qwen_image_edit_plus_pipeline(qwen_ctx, person):
    from diffusers import QwenImageEditPlusPipeline

    from portrait.stages import frontier, references
    from portrait.stages.backends import qwen_edit

    req = request_for(qwen_ctx, person, "qwen-edit", references=1)
    pictures = references.identity_references(qwen_ctx, person, 1, SIZE, "dlib")
    prompt = frontier.reference_prompt(req.prompt, qwen_edit.INSTRUCTION, 1)
    ours_pipe = frontier.load_frontier_pipeline(qwen_ctx, req, "edit")
    ours = frontier.call(ours_pipe, {**qwen_edit.pipeline_args(req, prompt, pictures, 7, 4.0),
                                     "output_type": "latent"}).float()
    ref = oracle(QwenImageEditPlusPipeline, qwen_ctx)
    args = dict(image=bundle_pictures(person, 1), prompt=prompt, negative_prompt=" ", true_cfg_scale=4.0,
                height=SIZE, width=SIZE, num_inference_steps=STEPS, generator=torch.Generator("cpu").manual_seed(7))
    theirs = latents(ref, **args)
    diff = float((ours - theirs).abs().max())
    ref.transformer = perturbed(ref)
    moved = float((latents(ref, **{**args, "generator": torch.Generator("cpu").manual_seed(7)}) - theirs).abs().max())
    report("qwen-edit", diff, moved)
    assert ours.shape == theirs.shape and diff <= 1e-4
    assert moved > 1e-3


def test_qwen_edit_f2p_lora_and_limits(qwen_ctx, person):
    plain = list(generate_candidates(request_for(qwen_ctx, person, "qwen-edit", references=1, true_cfg=1.0), qwen_ctx))[0]
    f2p = list(generate_candidates(request_for(qwen_ctx, person, "qwen-edit", references=1, true_cfg=1.0, f2p=True),
                                   qwen_ctx))[0]
    assert f2p.info["loras"][0]["name"] == "qwen-image-edit-f2p"
    assert not np.array_equal(plain.image, f2p.image)
    with pytest.raises(BadInput, match="3 pictures at most"):
        list(generate_candidates(request_for(qwen_ctx, person, "qwen-edit", references=4), qwen_ctx))


# --- zimage -----------------------------------------------------------------------------------


def test_zimage_matches_zimage_pipeline(tiny_home, person):
    from diffusers import ZImagePipeline

    from portrait.stages import frontier
    from portrait.stages.backends import zimage

    ctx = RunContext.create(tiny_home, preset="tiny-zimage")
    req = request_for(ctx, person, "zimage")
    assert req.guidance == 0.0 and req.steps == STEPS
    ours_pipe = frontier.load_frontier_pipeline(ctx, req, "txt2img")
    options = zimage.SPEC.read(req)
    ours = frontier.call(ours_pipe, {**zimage.pipeline_args(ctx, req, 7, options), "output_type": "latent"}).float()
    ref = oracle(ZImagePipeline, ctx)
    args = dict(prompt=FILLED, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=0.0,
                max_sequence_length=512, generator=torch.Generator("cpu").manual_seed(7))
    theirs = latents(ref, **args)
    diff = float((ours - theirs).abs().max())
    ref.transformer = perturbed(ref)
    moved = float((latents(ref, **{**args, "generator": torch.Generator("cpu").manual_seed(7)}) - theirs).abs().max())
    report("zimage", diff, moved)
    assert ours.shape == theirs.shape and diff <= 1e-4
    assert moved > 1e-3
    candidate = list(generate_candidates(req, ctx))[0]
    assert candidate.info["identity_mode"] == "none" and "no zimage LoRA" in candidate.info["note"]


def test_frontier_backends_refuse_the_wrong_family_and_sampler(tiny_home, person):
    ctx = RunContext.create(tiny_home, preset="tiny")
    with pytest.raises(BadInput, match="runs on flux2-klein"):
        list(generate_candidates(request_for(ctx, person, "klein-ref"), ctx))
    klein = RunContext.create(tiny_home, preset="tiny-flux2-klein")
    policy = GeneratePolicy.from_preset(klein.preset)
    req = resolve_request(person, policy, template=None, prompt="x", backend="klein-ref", n=1, seed=1,
                          overrides={"width": SIZE, "height": SIZE, "steps": 1, "scheduler": "euler"})
    with pytest.raises(BadInput, match="flow_euler"):
        list(generate_candidates(req, klein))
