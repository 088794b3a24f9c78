"""Zero-shot identity backends: InstantID, IP-Adapter FaceID(-PlusV2), PhotoMaker v1/v2.

Where a reference can run here it is the oracle: diffusers' own IP-Adapter recipe for
FaceID, TencentARC's PhotoMaker v1 package (`photomakerv`, a dev dependency, so CI runs it) for
PhotoMaker. InstantID's is instantX-research/InstantID's own code (its `draw_kps`, its
`Resampler` and its `StableDiffusionXLInstantIDPipeline`, which feeds the IdentityNet the face
tokens), run by `scripts/reference_fixtures.py` from the fetched repository with the two shims
tests/instantid_reference.py documents, on our tiny weights; what it computed is stored in
tests/fixtures/reference/ and every run compares against it (tests/reference_fixtures.py).
Invariants besides: scale 0 equals the plain pipeline, the IdentityNet's blocks see the face
tokens, and processor numbering follows `unet.attn_processors`.
Measured max differences are printed (`pytest -s`) and bounded by the assertions.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch
from PIL import Image

from portrait.core.context import RunContext
from portrait.core.errors import BadInput
from portrait.stages import embed as emb
from portrait.stages import zeroshot as zs
from portrait.stages.backends import faceid as fid
from portrait.stages.backends import instantid as iid
from portrait.stages.generate import GeneratePolicy, generate_candidates, resolve_request

from instantid_reference import reference_modules, sized_resampler
from reference_fixtures import max_diff, reference
from test_embed import make_identity

SIZE = 64
STEPS = 2


@pytest.fixture(scope="module")
def ctx_xl(tiny_home):
    return RunContext.create(tiny_home, preset="tiny-sdxl")


@pytest.fixture(scope="module")
def ctx15(tiny_home):
    return RunContext.create(tiny_home, preset="tiny")


@pytest.fixture(scope="module")
def person(tiny_home, hopper, astronaut):
    return make_identity(tiny_home, "zs-person", [hopper, astronaut], reference=hopper)


def request_for(ctx, identity, backend, prompt=None, seed=3, n=1, controls=None, lora_weight=None, people=(),
                **options):
    """`people`: the other identities in the picture (resolve_request takes the bundles themselves)."""
    policy = GeneratePolicy.from_preset(ctx.preset)
    overrides = {"width": SIZE, "height": SIZE, "steps": STEPS, "scheduler": "euler", "guidance": 5.0,
                 "options": options, "controls": controls, "lora_weight": lora_weight}
    return resolve_request(identity, policy, template=None, prompt=prompt, backend=backend, n=n, seed=seed,
                           overrides=overrides, people=list(people))


def run(ctx, request):
    return list(generate_candidates(request, ctx))


def plain(ctx, request, **kwargs):
    """The plain base pipeline (no adapter) with the same prompt, seed and scheduler."""
    from portrait.stages.sd import call_pipeline, load_sd_pipeline, prepare_pipeline

    pipe = load_sd_pipeline(ctx, "txt2img")
    prepare_pipeline(pipe, request, ctx)
    return call_pipeline(pipe, request, request.seed, **kwargs)


def maxdiff(a, b) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


# --- keypoints ----------------------------------------------------------------------------------


def test_draw_kps_follows_instantid():
    kps = np.array([[20, 30], [44, 30], [32, 40], [24, 52], [40, 52]], dtype=np.float32)
    image = iid.draw_kps(64, 64, kps)
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    for (x, y), color in zip(kps.astype(int), iid.KPS_COLORS):
        assert tuple(image[y, x]) == color  # full-strength circles on top
    assert tuple(image[0, 0]) == (0, 0, 0)  # black canvas
    # the limb from the left eye to the nose, away from both circles: red dimmed by 0.6
    far = iid.draw_kps(256, 256, kps * 4)
    mid = ((kps[0] + kps[2]) / 2 * 4).astype(int)
    assert tuple(far[mid[1], mid[0]]) == (153, 0, 0)


def test_fit_points_matches_controls_fit():
    points = np.array([[100.0, 50.0]])
    # 200x100 -> 64x64: center crop to 100x100 (x0=50), then scale 0.64
    assert np.allclose(iid.fit_points(points, (200, 100), 64, 64), [[32.0, 32.0]])


# --- InstantID ------------------------------------------------------------------------------------


def test_instantid_scale_zero_equals_plain_pipeline(ctx_xl, person):
    req = request_for(ctx_xl, person, "instantid", ip_adapter_scale=0.0, controlnet_conditioning_scale=0.0)
    ours = run(ctx_xl, req)[0].image
    base = plain(ctx_xl, req)
    diff = maxdiff(ours, base)
    print(f"instantid scale 0 vs plain SDXL: max |diff| = {diff} (uint8)")
    assert diff <= 1


def test_instantid_tokens_numbering_and_identitynet_input(ctx_xl, person):
    from portrait.stages.sd import load_sd_pipeline

    af = iid.instantid_adapter(ctx_xl)
    inputs = iid.instantid_inputs(ctx_xl, person, af, emb.EmbedPolicy())
    assert inputs.id_embeds.shape == (2, 1, 1, 512) and not inputs.id_embeds[0].any()
    pipe = load_sd_pipeline(ctx_xl, "txt2img")
    with zs.attached_ip_adapter(pipe, af):
        # processor numbering: the checkpoint's index i is the i-th of unet.attn_processors
        numbering = zs.processor_numbering(pipe.unet)
        cross = [name for name in numbering if not name.endswith("attn1.processor")]
        assert cross and all(numbering[name] % 2 == 1 for name in cross)
        processors = pipe.unet.attn_processors
        assert len(numbering) == len([n for n in af.state["ip_adapter"] if n.endswith("to_k_ip.weight")]) * 2
        for name, i in numbering.items():
            proc = processors[name]
            if name in cross:
                assert torch.equal(proc.to_k_ip[0].weight, af.state["ip_adapter"][f"{i}.to_k_ip.weight"])
                assert torch.equal(proc.to_v_ip[0].weight, af.state["ip_adapter"][f"{i}.to_v_ip.weight"])
            else:
                assert not hasattr(proc, "to_k_ip")
        tokens = iid.face_tokens(pipe, inputs.id_embeds)  # the reference's own Resampler: the test below
    assert tokens.shape == (2, 16, af.state["image_proj"]["proj_out.weight"].shape[0])

    seen = []
    req = request_for(ctx_xl, person, "instantid")
    net = load_sd_pipeline(ctx_xl, "txt2img", (ctx_xl.preset.model("instantid_controlnet"),)).controlnet
    # what the IdentityNet's own blocks receive (the module hooks of `net` run before the swap)
    handle = net.mid_block.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["encoder_hidden_states"]), with_kwargs=True)
    try:
        candidate = run(ctx_xl, req)[0]
    finally:
        handle.remove()
    assert seen and all(torch.allclose(s, tokens, atol=1e-5) for s in seen)
    assert candidate.info["identity_mode"] == "zero-shot"
    assert candidate.info["embedding"]["space"] == "insightface:antelopev2"
    assert not hasattr(net, "forward") or "forward" not in net.__dict__  # the swap is undone


# --- InstantID against instantX-research/InstantID (stored figures) -----------------------------------


def reference_instantid(ctx, modules):
    """The reference's StableDiffusionXLInstantIDPipeline as its README builds it: the base, the
    IdentityNet as its ControlNet, `load_ip_adapter_instantid(ip-adapter.bin)`, on a fresh copy
    of our tiny weights (it swaps the UNet's attention processors for its own), the preset's VAE
    role and our `euler` sampler (recording only)."""
    from diffusers import ControlNetModel, EulerDiscreteScheduler

    from portrait.core.loaders import load_components

    pipeline, resampler = modules
    adapter = ctx.resolve(ctx.preset.model("instantid_adapter"))
    pipeline.Resampler = sized_resampler(resampler, torch.load(adapter.path, weights_only=True)["image_proj"])
    net = ControlNetModel.from_pretrained(ctx.resolve(ctx.preset.model("instantid_controlnet")).root / "ControlNetModel",
                                          torch_dtype=torch.float32)
    pipe = pipeline.StableDiffusionXLInstantIDPipeline.from_pretrained(
        ctx.resolve_role("base").root, controlnet=net, variant="fp16", torch_dtype=torch.float32,
        vae=load_components(ctx)["vae"])
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.load_ip_adapter_instantid(str(adapter.path))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_instantid_keypoint_map_matches_the_reference_draw_kps(tmp_path_factory):
    """Ours (stages/keypoints.py) and the reference's `draw_kps`, pixel for pixel: a 64 px map
    and a 256x192 one with fractional keypoints (the reference truncates with int())."""
    points = np.array([[20, 30], [44, 30], [32, 40], [24, 52], [40, 52]], dtype=np.float32)
    cases = {"small": (64, 64, points), "large": (256, 192, points * [4.0, 3.0] + [0.6, 0.3])}

    def draw():
        with reference_modules(tmp_path_factory.mktemp("instantid-ref")) as (pipeline, _):
            return {name: np.asarray(pipeline.draw_kps(Image.new("RGB", (w, h)), kps))
                    for name, (w, h, kps) in cases.items()}

    theirs = reference("instantid_draw_kps", draw)
    for name, (w, h, kps) in cases.items():
        ours = iid.draw_kps(w, h, kps)
        diff = max_diff(ours, theirs[name])
        print(f"instantid keypoint map {name} ({w}x{h}) vs reference draw_kps: max |diff| = {diff}")
        assert diff == 0.0 and ours.any()


def test_instantid_face_tokens_match_the_reference_resampler(ctx_xl, person, tmp_path_factory):
    """The 16 face tokens (uncond = the Resampler on zeros, first) by diffusers' projection on our
    side and by the reference pipeline's `_encode_prompt_image_emb` (its Resampler, loaded by
    its `set_image_proj_model`) from the same raw antelopev2 embedding."""
    from portrait.stages.sd import load_sd_pipeline

    af = iid.instantid_adapter(ctx_xl)
    found = iid.instantid_inputs(ctx_xl, person, af, emb.EmbedPolicy())
    embedding = found.id_embeds[1, 0, 0].float()

    def resampler():
        with reference_modules(tmp_path_factory.mktemp("instantid-ref")) as modules:
            ref = reference_instantid(ctx_xl, modules)
            with torch.no_grad():
                tokens = ref._encode_prompt_image_emb(embedding.numpy(), torch.device("cpu"), 1, torch.float32, True)
        return {"embedding": embedding, "tokens": tokens}

    theirs = reference("instantid_tokens", resampler)
    assert max_diff(embedding, theirs["embedding"]) <= 1e-4  # the embed stage still reads the recorded face
    stored = torch.from_numpy(theirs["embedding"])[None, None, None, :]
    pipe = load_sd_pipeline(ctx_xl, "txt2img")
    with zs.attached_ip_adapter(pipe, af):
        ours = iid.face_tokens(pipe, torch.cat([torch.zeros_like(stored), stored]))
    diff = max_diff(ours, theirs["tokens"])
    print(f"instantid face tokens vs reference Resampler: max |diff| = {diff:.2e}")
    assert ours.shape == theirs["tokens"].shape == (2, 16, ours.shape[-1]) and diff <= 1e-5


INSTANTID_CASES = ((3, {}), (4, {"ip_adapter_scale": 0.5, "controlnet_conditioning_scale": 1.2}))


def test_instantid_matches_the_reference_pipeline(ctx_xl, person, tmp_path_factory, monkeypatch):
    """Our backend end to end (generate_candidates, the raw antelopev2 embedding of the identity,
    keypoints of its reference photo) and the reference pipeline's `__call__` on the same tiny
    weights, prompt, embedding, keypoint map, seed and scales: the images before the uint8
    rounding, at the defaults (0.8, 0.8) and at ip_adapter_scale 0.5 / IdentityNet 1.2."""
    from portrait.stages import sd
    from portrait.stages.sd import to_uint8

    requests = [request_for(ctx_xl, person, "instantid", seed=seed, **options) for seed, options in INSTANTID_CASES]
    policy = iid.InstantIDPolicy.from_options(iid.SPEC.read(requests[0]))
    found = iid.instantid_inputs(ctx_xl, person, iid.instantid_adapter(ctx_xl), emb.EmbedPolicy())
    pose = iid.pose_reference(ctx_xl, requests[0], emb.EmbedPolicy())
    kps = iid.fit_points(pose.kps, pose.image.shape[1::-1], SIZE, SIZE)

    def pipeline():
        out = {"embedding": found.id_embeds[1, 0, 0].float(), "kps": kps}
        with reference_modules(tmp_path_factory.mktemp("instantid-ref")) as modules:
            ref = reference_instantid(ctx_xl, modules)
            kps_map = modules[0].draw_kps(Image.new("RGB", (SIZE, SIZE)), kps)
            for i, req in enumerate(requests):
                scales = iid.InstantIDPolicy.from_options(iid.SPEC.read(req))
                out[f"image{i}"] = ref(
                    req.prompt, negative_prompt=req.negative_prompt or None, image_embeds=out["embedding"].numpy(),
                    image=kps_map, controlnet_conditioning_scale=scales.identitynet_scale,
                    ip_adapter_scale=scales.ip_scale, num_inference_steps=req.steps, guidance_scale=req.guidance,
                    width=SIZE, height=SIZE, generator=torch.Generator().manual_seed(req.seed),
                    output_type="np").images[0]
        return out

    theirs = reference("instantid_pipeline", pipeline)
    assert max_diff(found.id_embeds[1, 0, 0], theirs["embedding"]) <= 1e-4 and max_diff(kps, theirs["kps"]) <= 1e-4
    assert (policy.ip_scale, policy.identitynet_scale) == (0.8, 0.8)
    monkeypatch.setattr(sd, "to_uint8", lambda image: np.asarray(image, dtype=np.float32))  # the float image
    for i, req in enumerate(requests):
        ours = run(ctx_xl, req)[0].image
        diff = max_diff(ours, theirs[f"image{i}"])
        rounded = maxdiff(to_uint8(ours), to_uint8(theirs[f"image{i}"]))
        print(f"instantid {INSTANTID_CASES[i][1] or 'defaults'} seed {req.seed}: max |diff| vs reference pipeline "
              f"= {diff:.2e} ({rounded} in uint8)")
        assert diff <= 1e-4 and rounded <= 1
    assert max_diff(theirs["image0"], theirs["image1"]) > 1e-2  # the scales reach the image


def test_instantid_with_an_extra_controlnet(ctx_xl, person):
    out = run(ctx_xl, request_for(ctx_xl, person, "instantid", controls={"canny": 0.5}))[0]
    assert set(out.info["controls"]) == {"identitynet", "canny"}
    assert out.info["controls"]["canny"]["source"] == "opencv"


def test_instantid_pose_reference_without_face_is_refused(ctx_xl, person, tmp_path):
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(blank)
    with pytest.raises(BadInput, match="no face found in the pose reference"):
        run(ctx_xl, request_for(ctx_xl, person, "instantid", pose_image=str(blank)))


# --- FaceID ----------------------------------------------------------------------------------------


def test_faceid_plusv2_matches_diffusers_recipe(ctx15, person):
    """Reference: diffusers' documented FaceID-PlusV2 usage on a separately loaded pipeline."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    from portrait.core.loaders import load_components

    req = request_for(ctx15, person, "faceid", ip_adapter_scale=0.7, s_scale=0.9)
    ours = run(ctx15, req)[0]
    assert ours.info["adapter"]["variant"] == "plusv2"

    policy = zs.FaceIDPolicy.from_options(req.options)
    af = zs.faceid_adapter(ctx15, policy)
    inputs = zs.faceid_inputs(ctx15, person, policy, af, emb.EmbedPolicy())
    base = ctx15.resolve_role("base").root
    adapter = ctx15.resolve_role("faceid_plus")
    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False,
                                                   vae=load_components(ctx15)["vae"])  # the preset's VAE role
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.load_ip_adapter(str(adapter.root), subfolder="", weight_name="ip-adapter-faceid-plusv2_sd15.bin",
                         image_encoder_folder=None)
    pipe.set_ip_adapter_scale(0.7)
    projection = pipe.unet.encoder_hid_proj.image_projection_layers[0]
    projection.clip_embeds = inputs.clip_embeds
    projection.shortcut = True
    projection.shortcut_scale = 0.9
    ref = pipe(req.prompt, negative_prompt=req.negative_prompt or None, ip_adapter_image_embeds=[inputs.id_embeds],
               num_inference_steps=STEPS, guidance_scale=5.0, width=SIZE, height=SIZE, output_type="np",
               generator=torch.Generator().manual_seed(req.seed)).images[0]
    ref = (np.clip(ref, 0, 1) * 255).round().astype(np.uint8)
    diff = maxdiff(ours.image, ref)
    print(f"faceid-plusv2 (ours) vs diffusers' recipe: max |diff| = {diff} (uint8)")
    assert diff <= 1


def test_faceid_plus_v1_comes_from_the_registry(ctx15, person):
    """faceid_variant=plus resolves the preset's FaceID-Plus v1 entry (h94's real files, tiny
    stand-in offline) with no user path, and runs without PlusV2's shortcut."""
    spec = ctx15.registry.get("ip-adapter-faceid-plus-sd15")
    assert spec.repo == "h94/IP-Adapter-FaceID" and spec.files[0] == "ip-adapter-faceid-plus_sd15.bin"
    assert ctx15.preset.model("faceid_plus_v1") == "ip-adapter-faceid-plus-sd15"
    v1 = run(ctx15, request_for(ctx15, person, "faceid", faceid_variant="plus"))[0]
    assert v1.info["adapter"]["id"] == "tiny-faceid-plus-sd15" and v1.info["adapter"]["variant"] == "plus"
    v2 = run(ctx15, request_for(ctx15, person, "faceid", faceid_variant="plusv2"))[0]
    assert v2.info["adapter"]["id"] == "tiny-faceid-plusv2-sd15"
    assert maxdiff(v1.image, v2.image) > 0


def test_faceid_scale_zero_without_lora_equals_plain(ctx15, person):
    req = request_for(ctx15, person, "faceid", faceid_variant="faceid", ip_adapter_scale=0.0,
                      faceid_lora_scale=0.0)
    ours = run(ctx15, req)[0].image
    diff = maxdiff(ours, plain(ctx15, req))
    print(f"faceid scale 0, LoRA 0 vs plain SD1.5: max |diff| = {diff} (uint8)")
    assert diff <= 1
    # and the adapter really acts when on
    on = run(ctx15, request_for(ctx15, person, "faceid", faceid_variant="faceid", ip_adapter_scale=1.0))[0].image
    assert maxdiff(on, ours) > 0


@pytest.fixture(scope="module")
def person_with_lora(tiny_home, ctx15, hopper, astronaut):
    """A bundle with a (random, rank 4) SD1.5 identity LoRA in diffusers/PEFT format."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from portrait.core.bundle import load_identity, write_manifest

    identity = make_identity(tiny_home, "zs-lora", [hopper, astronaut], reference=hopper)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(ctx15.resolve_role("base").root / "unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                init_lora_weights=False))  # random A and B: a LoRA that acts
    StableDiffusionPipeline.save_lora_weights(identity.root, unet_lora_layers=get_peft_model_state_dict(unet),
                                              weight_name="lora.safetensors")
    write_manifest(identity.root, {**identity.manifest, "loras": {"sd15": {
        "file": "lora.safetensors", "base_model": "tiny-sd15", "rank": 4, "alpha": 4}}})
    return load_identity(tiny_home, "zs-lora")


def test_faceid_with_identity_lora(ctx15, person_with_lora):
    with_lora = run(ctx15, request_for(ctx15, person_with_lora, "faceid", lora_weight=1.0))[0]
    assert with_lora.info["identity_mode"] == "zero-shot+lora" and with_lora.info["loras"]
    muted = run(ctx15, request_for(ctx15, person_with_lora, "faceid", lora_weight=0.0))[0]
    assert maxdiff(with_lora.image, muted.image) > 0  # the identity LoRA acts
    # weight 0 is exactly FaceID alone: the FaceID LoRA keeps its own weight beside it
    diff = maxdiff(muted.image, _faceid_only(ctx15, person_with_lora))
    print(f"faceid + identity LoRA at weight 0 vs faceid alone: max |diff| = {diff} (uint8)")
    assert diff <= 1


def _faceid_only(ctx, identity_with_lora):
    from dataclasses import replace

    bare = replace(identity_with_lora, loras={})
    return run(ctx, request_for(ctx, bare, "faceid"))[0].image


def test_faceid_sdxl_with_a_controlnet(ctx_xl, person):
    out = run(ctx_xl, request_for(ctx_xl, person, "faceid", controls={"canny": 0.6}))[0]
    assert out.info["adapter"]["id"] == "tiny-faceid-plusv2-sdxl"
    assert out.info["controls"] == {"canny": {"strength": 0.6, "source": "opencv"}}
    assert out.image.shape == (SIZE, SIZE, 3)


def test_faceid_uncond_is_zeros_and_adapter_attached_once_per_pipeline(ctx15, person, monkeypatch):
    """The adapter is attached once per loaded pipeline and kept while it is cached: a second
    request attaches nothing; a backend without an adapter gets the UNet back without it."""
    from portrait.stages.sd import load_sd_pipeline

    policy = zs.FaceIDPolicy(variant="faceid")
    af = zs.faceid_adapter(ctx15, policy)
    inputs = zs.faceid_inputs(ctx15, person, policy, af, emb.EmbedPolicy())
    assert inputs.id_embeds.shape == (2, 1, 512)
    assert not inputs.id_embeds[0].any() and torch.allclose(inputs.id_embeds[1].norm(dim=-1), torch.ones(1))
    pipe = load_sd_pipeline(ctx15, "txt2img")
    loads = []
    original = type(pipe).load_ip_adapter
    monkeypatch.setattr(type(pipe), "load_ip_adapter", lambda self, *a, **k: (loads.append(1), original(self, *a, **k)))
    for _ in range(2):  # two requests on the cached pipeline
        pipe = load_sd_pipeline(ctx15, "txt2img", keep_adapter=True)
        with zs.attached_faceid(pipe, af, inputs, policy):
            assert zs.FACEID_LORA_ADAPTER in pipe.unet.peft_config
        assert pipe.unet.encoder_hid_proj is not None  # kept between requests
    assert len(loads) == 1
    plain = load_sd_pipeline(ctx15, "txt2img")  # a backend that runs without an adapter
    assert plain.unet is pipe.unet and plain.unet.encoder_hid_proj is None
    assert zs.FACEID_LORA_ADAPTER not in (getattr(plain.unet, "peft_config", {}) or {})
    pipe = load_sd_pipeline(ctx15, "txt2img", keep_adapter=True)
    with zs.attached_faceid(pipe, af, inputs, policy):
        pass
    assert len(loads) == 2  # attached again after it was taken off
    load_sd_pipeline(ctx15, "txt2img")  # leave the shared pipeline clean for the other tests


def test_wrong_adapter_file_is_refused(ctx15, tiny_home):
    sdxl_instantid = RunContext.create(tiny_home, preset="tiny-sdxl").resolve("instantid-adapter").path
    with pytest.raises(BadInput, match="not faceid"):
        zs.faceid_adapter(ctx15, zs.FaceIDPolicy(variant="faceid", model=str(sdxl_instantid)))


# --- PhotoMaker ------------------------------------------------------------------------------------


def test_photomaker_trigger_rules():
    from portrait.stages.backends.photomaker import split_trigger

    parts = split_trigger("portrait photo of a woman img, studio light", "img")
    assert parts.class_word == "woman" and parts.text_only == "portrait photo of a woman, studio light"
    with pytest.raises(BadInput, match="needs the trigger word 'img' right after the class word"):
        split_trigger("portrait photo of a woman", "img")
    with pytest.raises(BadInput, match="directly follow a class word"):
        split_trigger("img portrait", "img")
    with pytest.raises(BadInput, match="appears 2 times"):
        split_trigger("a man img and a woman img", "img")


def test_photomaker_class_tokens_per_version(ctx_xl):
    """v1 fuses one token per photo, v2 two: the class word is repeated accordingly."""
    from portrait.stages.backends.photomaker import class_token_ids, load_photomaker, split_trigger
    from portrait.stages.sd import load_sd_pipeline

    pipe = load_sd_pipeline(ctx_xl, "txt2img")
    parts = split_trigger("a photo of a woman img smiling", "img")
    for version, per_photo in ((1, 1), (2, 2)):
        model = load_photomaker(ctx_xl, ctx_xl.preset.model(f"photomaker_v{version}"), version)
        assert model.encoder.tokens_per_image == per_photo
        ids, mask = class_token_ids(pipe.tokenizer, parts, 3 * per_photo)
        woman = pipe.tokenizer("woman", add_special_tokens=False).input_ids[-1]
        assert sum(mask) == 3 * per_photo and all(ids[i] == woman for i, m in enumerate(mask) if m)
        assert len(ids) == pipe.tokenizer.model_max_length


def test_photomaker_v2_fuses_only_the_class_slots(ctx_xl, person):
    from portrait.stages.backends.photomaker import (encode_with_ids, id_images, load_photomaker,
                                                    split_trigger)
    from portrait.stages.sd import load_sd_pipeline

    model = load_photomaker(ctx_xl, ctx_xl.preset.model("photomaker_v2"), 2)
    req = request_for(ctx_xl, person, "photomaker", prompt="a photo of a woman img smiling")
    ids = id_images(ctx_xl, req, model)
    assert ids.id_embeds.shape == (2, 512) and ids.pixels.shape[0] == 2
    pipe = load_sd_pipeline(ctx_xl, "txt2img")
    with torch.no_grad():
        tokens = model.encoder.id_tokens(ids.pixels, ids.id_embeds)
        assert tokens.shape == (4, pipe.unet.config.cross_attention_dim)  # 2 photos x 2 tokens
        prompt_embeds, _, mask = encode_with_ids(pipe, split_trigger(req.prompt, "img"), tokens.shape[0])
        fused = model.encoder.fuse_module(prompt_embeds, tokens, mask)
    assert torch.equal(fused[~mask], prompt_embeds[~mask])
    assert (fused[mask] - prompt_embeds[mask]).abs().amax(dim=-1).min() > 0
    # slot k is fuse(class-word state at k, ID token k), in photo order
    with torch.no_grad():
        expected = model.encoder.fuse_module.fuse(prompt_embeds[mask], tokens)
    assert torch.allclose(fused[mask], expected, atol=1e-6)


def test_photomaker_version_mismatch_is_refused(ctx_xl, person):
    from portrait.stages.backends.photomaker import load_photomaker

    v1_file = ctx_xl.resolve("photomaker-v1").path
    with pytest.raises(BadInput, match="is a PhotoMaker v1 checkpoint"):
        load_photomaker(ctx_xl, str(v1_file), expected=2)
    with pytest.raises(BadInput, match="trigger word 'img'"):
        run(ctx_xl, request_for(ctx_xl, person, "photomaker", prompt="a photo of a woman"))


@pytest.mark.slow
def test_photomaker_v1_matches_tencentarc_reference(ctx_xl, person, monkeypatch):
    """Reference: TencentARC's PhotoMaker v1 pipeline (PyPI `photomakerv`) on the same tiny weights."""
    # a dev dependency (pyproject's dev extra pins photomakerv): missing, this fails, never skips
    import photomaker.model as pm_model
    import photomaker.pipeline as pm_pipeline
    from diffusers import EulerDiscreteScheduler
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from portrait.core.loaders import load_components
    from portrait.core.archs.photomaker import encoder_shape

    resolved = ctx_xl.resolve("photomaker-v1")
    state = torch.load(resolved.path, map_location="cpu", weights_only=True)
    shape = encoder_shape(state["id_encoder"])

    class TinyReferenceEncoder(pm_model.PhotoMakerIDEncoder):
        # the package hard-codes ViT-L sizes; build its class at the tiny sizes, keep its forward
        def __init__(self):
            CLIPVisionModelWithProjection.__init__(self, CLIPVisionConfig(**shape.clip))
            self.visual_projection_2 = torch.nn.Linear(shape.clip["hidden_size"], shape.text_2, bias=False)
            self.fuse_module = pm_model.FuseModule(shape.dim)

    monkeypatch.setattr(pm_pipeline, "PhotoMakerIDEncoder", TinyReferenceEncoder)
    prompt = "portrait photo of a woman img, studio light"
    req = request_for(ctx_xl, person, "photomaker", prompt=prompt, photomaker_version=1, start_merge_step=0)

    # the reference on its own, freshly loaded copy of the base (the preset's VAE role, as ours)
    ref_pipe = pm_pipeline.PhotoMakerStableDiffusionXLPipeline.from_pretrained(
        ctx_xl.resolve_role("base").root, variant="fp16", torch_dtype=torch.float32,
        vae=load_components(ctx_xl)["vae"])
    ref_pipe.scheduler = EulerDiscreteScheduler.from_config(ref_pipe.scheduler.config)
    ref_pipe.load_photomaker_adapter(str(resolved.root), weight_name=resolved.path.name, trigger_word="img")
    photos = [Image.open(p).convert("RGB") for p in emb.identity_photos(person, 8)]
    ref = ref_pipe(prompt, negative_prompt=req.negative_prompt or None, input_id_images=photos,
                   num_inference_steps=STEPS, guidance_scale=5.0, width=SIZE, height=SIZE, start_merge_step=0,
                   generator=torch.Generator().manual_seed(req.seed), output_type="np").images[0]
    ref = (np.clip(ref, 0, 1) * 255).round().astype(np.uint8)

    ours = run(ctx_xl, req)[0]
    assert ours.info["adapter"]["version"] == 1
    diff = maxdiff(ours.image, ref)
    print(f"photomaker v1 (ours) vs TencentARC photomakerv: max |diff| = {diff} (uint8)")
    assert diff <= 1


def test_photomaker_v2_end_to_end(ctx_xl, person):
    req = request_for(ctx_xl, person, "photomaker", prompt="portrait photo of a woman img", n=2)
    out = run(ctx_xl, req)
    assert [c.seed for c in out] == [req.seed, req.seed + 1]
    info = out[0].info
    assert info["adapter"]["version"] == 2 and info["adapter"]["tokens_per_photo"] == 2
    assert info["embedding"]["space"] == "insightface:buffalo_l" and not info["embedding"]["normalized"]
    assert len(info["id_photos"]) == 2
    assert out[0].image.shape == (SIZE, SIZE, 3) and maxdiff(out[0].image, out[1].image) > 0


def test_faceid_on_an_inpainting_pass(ctx15, person, hopper):
    """What the template backend does: FaceID inside an inpainting call, then a clean pipeline."""
    from portrait.stages.sd import call_pipeline, load_sd_pipeline, prepare_pipeline

    req = request_for(ctx15, person, "faceid", ip_adapter_scale=1.0)
    pipe = load_sd_pipeline(ctx15, "inpaint", role="inpaint")
    prepare_pipeline(pipe, req, ctx15)
    image = Image.fromarray(hopper).resize((SIZE, SIZE))
    mask = Image.fromarray(np.pad(np.full((32, 32), 255, np.uint8), 16))
    args = {"image": image, "mask_image": mask, "strength": 0.6, "width": SIZE, "height": SIZE}
    before = call_pipeline(pipe, req, req.seed, **args)
    with zs.faceid_for_request(ctx15, pipe, req, person) as faceid:
        painted = call_pipeline(pipe, req, req.seed, **args, **faceid.kwargs)
        assert faceid.info["embedding"]["space"] == "insightface:buffalo_l"
    # the adapter stays on the cached pipeline; a pass without one gets the UNet back as it was
    pipe = load_sd_pipeline(ctx15, "inpaint", role="inpaint")
    after = call_pipeline(pipe, req, req.seed, **args)
    assert maxdiff(painted, before) > 0
    assert maxdiff(after, before) == 0  # the shared pipeline is exactly as it was


# --- regional identities -------------------------------------------------------------------------


def _first_step(ctx, req, inputs, masks):
    """The first cross-attention layer's output and the UNet's noise prediction at the first
    step of a FaceID call with these embeddings and IP-Adapter masks (the backend's call)."""
    from portrait.stages.sd import call_pipeline, controlnet_ids, load_sd_pipeline, prepare_pipeline

    policy = zs.FaceIDPolicy(variant="faceid")
    af = zs.faceid_adapter(ctx, policy)
    pipe = load_sd_pipeline(ctx, "txt2img", controlnet_ids(ctx, []))
    prepare_pipeline(pipe, req, ctx)
    attn2 = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str, pick):
        def hook(module, args, out) -> None:  # returns None: the output stays as it is
            if name not in seen:
                seen[name] = pick(out).detach().clone()
        return hook

    hooks = [attn2.register_forward_hook(keep("attn", lambda out: out)),
             pipe.unet.register_forward_hook(keep("eps", lambda out: out[0]))]
    try:
        with zs.attached_faceid(pipe, af, inputs, policy) as extra:
            zs.activate_with_faceid(pipe, [], policy)
            call_pipeline(pipe, req, req.seed, **extra, cross_attention_kwargs={"ip_adapter_masks": [masks]})
            pipe.disable_lora()
    finally:
        for h in hooks:
            h.remove()
    side = SIZE // 8
    attn = seen["attn"][1].reshape(side, side, -1)  # CFG batch [uncond, cond]: the conditional half
    return attn, seen["eps"][1]  # eps: [C, h, w] of the conditional half


def test_regional_faceid_masks_confine_each_identity_to_its_region(ctx15, person, tiny_home, astronaut, hopper):
    """With IP-Adapter masks (left half: identity A, right half: B), changing A's embedding
    changes only A's half at the first cross-attention layer of the first step, and B's
    likewise (exactly zero elsewhere: the mask multiplies each identity's attention output)."""
    other = make_identity(tiny_home, "zs-other", [astronaut, np.ascontiguousarray(astronaut[:, ::-1])],
                          reference=astronaut)
    third = make_identity(tiny_home, "zs-third", [hopper], reference=hopper)
    req = request_for(ctx15, person, "faceid", people=[other])
    (cand,) = run(ctx15, req)  # the backend end to end: regional FaceID, faces listed for scoring
    assert [(f["identity"], f["face"]) for f in cand.info["faces"]] == [(person.name, 0), (other.name, 1)]
    assert cand.info["adapter"]["variant"] == "faceid" and cand.info["regions"] == [[0, 0, 0.5, 1], [0.5, 0, 1, 1]]

    policy, af = zs.FaceIDPolicy(variant="faceid"), zs.faceid_adapter(ctx15, zs.FaceIDPolicy(variant="faceid"))
    embed = emb.EmbedPolicy()

    def inputs(a, b):
        return fid.regional_faceid_inputs(ctx15, [a, b], policy, af, embed)[0]

    masks = fid.region_masks(fid.default_regions(2), SIZE, SIZE)
    attn_ab, eps_ab = _first_step(ctx15, req, inputs(person, other), masks)
    attn_cb, eps_cb = _first_step(ctx15, req, inputs(third, other), masks)  # A's slot changed
    attn_ac, eps_ac = _first_step(ctx15, req, inputs(person, third), masks)  # B's slot changed
    half = SIZE // 16
    for name, attn, eps, changed in (("A", attn_cb, eps_cb, slice(0, half)), ("B", attn_ac, eps_ac, slice(half, None))):
        kept = slice(half, None) if name == "A" else slice(0, half)
        d, e = (attn_ab - attn).abs(), (eps_ab - eps).abs()
        print(f"{name} changed: first cross-attention max |diff| in its region {d[:, changed].max():.3g}, "
              f"elsewhere {d[:, kept].max():.3g}; noise prediction mean |diff| {e[:, :, changed].mean():.3g} "
              f"vs {e[:, :, kept].mean():.3g}")
        assert d[:, changed].max() > 1e-4 and d[:, kept].max() == 0
        # Not asserted: on the tiny UNet (8x8 latents at 64 px, two resolutions) the
        # convolutions and self-attention after that layer spread the change over the whole
        # latent (measured: mean |diff| 0.0162 in A's half vs 0.0138 in B's).
    with pytest.raises(BadInput, match="option regions"):
        run(ctx15, request_for(ctx15, person, "faceid", people=[third], regions=[[0, 0, 1, 1]]))
    with pytest.raises(BadInput, match="faceid_variant=faceid"):
        run(ctx15, request_for(ctx15, person, "faceid", people=[third], faceid_variant="plusv2"))
