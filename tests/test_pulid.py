"""PuLID v1.1 on SDXL (backend `pulid`): checked against the reference code and by invariants.

The reference is ToTheBeginning/PuLID, imported from the fetched mirror (skipped when it is
not on this machine; nothing of it is vendored). Its pipeline module imports preprocessing
packages that are not installed here and that the compared code paths never call (basicsr,
facexlib, torchsde); the test puts empty stand-in modules under those names for the import
only. What is compared, on the same tiny weights, seed and inputs:

- IDFormer: the reference `IDFormer` (its mapping widths are fixed at 1024 / 1280, so it is
  built at those widths with a small core) against ours with its state dict loaded;
- EVA-CLIP: the reference `EVAVisionTransformer` at tiny width with the real depth (24) and
  layout flags, loaded with our tiny stand-in's EVA-CLIP keys, against timm's Eva built by
  portrait.core.archs.pulid (embedding and the five hidden states);
- the whole v1.1 sampler: the reference `PuLIDPipeline.inference` (its own UNet processors,
  Karras sigmas and DPM-Solver++(2M)) run on our tiny SDXL pipeline, with the ID tokens our
  backend computes, against our `render_karras`, in all three modes; latents compared.

Measured differences are printed (`pytest -s`).
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from portrait.core.archs import pulid as arch
from portrait.core.context import RunContext
from portrait.core.errors import BadInput
from portrait.core.tiny import pulid as tiny_pulid
from portrait.stages.generate import GeneratePolicy, generate_candidates, resolve_request

from pulid_reference import reference_modules
from reference_fixtures import max_diff, recording, reference, seeded_state
from test_embed import make_identity

SIZE = 64
STEPS = 3
TOL = 1e-4


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """The reference's modules when recording fixtures (tests/reference_fixtures.py), else None."""
    if not recording():
        yield None
        return
    with reference_modules(tmp_path_factory.mktemp("pulid-reference"), "pulid.pipeline_v1_1",
                           "pulid.attention_processor", "pulid.encoders_transformer", "pulid.utils",
                           "eva_clip.eva_vit_model") as m:
        yield types.SimpleNamespace(pipeline=m.pulid_pipeline_v1_1, attention=m.pulid_attention_processor,
                                    encoders=m.pulid_encoders_transformer, utils=m.pulid_utils,
                                    eva_vit=m.eva_clip_eva_vit_model)


@pytest.fixture(scope="module")
def ctx_xl(tiny_home):
    return RunContext.create(tiny_home, preset="tiny-sdxl")


@pytest.fixture(scope="module")
def person(tiny_home, hopper, astronaut):
    return make_identity(tiny_home, "pulid-person", [hopper, astronaut], reference=hopper)


@pytest.fixture(scope="module")
def parts(ctx_xl, person):
    """The backend's models, pipeline and the identity's ID tokens (fidelity defaults)."""
    from portrait.stages import embed as emb
    from portrait.stages.backends import pulid as backend
    from portrait.stages.sd import load_sd_pipeline

    models = backend.load_models(ctx_xl)
    inputs = backend.pulid_inputs(ctx_xl, person, models, emb.EmbedPolicy("all", 4))
    return types.SimpleNamespace(models=models, inputs=inputs, pipe=load_sd_pipeline(ctx_xl, "txt2img"),
                                 backend=backend)


def policy_of(parts, options):
    return parts.backend.PuLIDPolicy.from_options(parts.backend.PuLIDOptions(**options))


def request_for(ctx, identity, seed=3, n=1, guidance=2.0, **options):
    policy = GeneratePolicy.from_preset(ctx.preset)
    overrides = {"width": SIZE, "height": SIZE, "steps": STEPS, "guidance": guidance, "options": options}
    return resolve_request(identity, policy, template=None, prompt="portrait photo of a woman", backend="pulid",
                           n=n, seed=seed, overrides=overrides)


# --- architectures against the reference ------------------------------------------------------------------


def test_idformer_matches_reference(ref):
    config = arch.IDFormerConfig(dim=64, depth=5, dim_head=64, heads=2, num_id_token=5, num_queries=8, output_dim=96)
    state = seeded_state(arch.IDFormer(config), 0)
    ours = arch.build_idformer(state)
    assert ours.config.heads == 2 and ours.config.vit_dim == 1024 and ours.config.id_dim == 1280
    gen = torch.Generator().manual_seed(1)
    id_vectors = torch.randn(1, 3, 1280, generator=gen)  # three photos of one identity
    hidden = [torch.randn(1, 3 * 17, 1024, generator=gen) for _ in range(5)]
    single = (id_vectors[:, 0], [h[:, :17] for h in hidden])

    def pulid():
        theirs = ref.encoders.IDFormer(dim=64, depth=5, dim_head=64, heads=2, num_id_token=5, num_queries=8,
                                       output_dim=96).eval()
        theirs.load_state_dict(state, strict=True)
        with torch.no_grad():
            return {"three": theirs(id_vectors, hidden), "one": theirs(*single)}

    theirs = reference("pulid_idformer", pulid)
    with torch.no_grad():
        diff, one = max_diff(ours(id_vectors, hidden), theirs["three"]), max_diff(ours(*single), theirs["one"])
    print(f"IDFormer max|diff| {diff:.2e} (3 photos), {one:.2e} (1 photo)")
    assert theirs["three"].shape == (1, 8, 96) and diff <= 1e-5 and one <= 1e-5


def test_eva_visual_matches_reference(ref):
    from functools import partial

    c = tiny_pulid.EVA_TINY
    state = tiny_pulid.eva_tiny_state(7)
    ours = arch.build_eva_visual(state)
    pixels = torch.randn(2, 3, c["image"], c["image"], generator=torch.Generator().manual_seed(3))

    def eva():
        grid = c["image"] // c["patch"]
        theirs = ref.eva_vit.EVAVisionTransformer(
            img_size=c["image"], patch_size=c["patch"], num_classes=c["embed"], use_mean_pooling=False,
            init_values=None, embed_dim=c["width"], depth=c["depth"], num_heads=1, mlp_ratio=c["mlp"] / c["width"],
            qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), xattn=False, rope=True,
            pt_hw_seq_len=grid, intp_freq=True, naiveswiglu=True, subln=True).eval()
        visual = {k[len("visual."):]: v for k, v in state.items()}
        missing, unexpected = theirs.load_state_dict(visual, strict=False)
        assert not unexpected and all("rope" in k for k in missing), (missing, unexpected)
        with torch.no_grad():
            embed, hidden = theirs(pixels, return_all_features=False, return_hidden=True, shuffle=False)
        return {"embed": embed} | {f"hidden{i}": h for i, h in enumerate(hidden)}

    theirs = reference("pulid_eva_visual", eva)
    with torch.no_grad():
        embed, hidden = ours(pixels)
    assert len(hidden) == 5 == len(theirs) - 1
    diffs = [max_diff(embed, theirs["embed"])] + [max_diff(h, theirs[f"hidden{i}"]) for i, h in enumerate(hidden)]
    print("EVA max|diff| embed, hidden 0-4:", " ".join(f"{d:.2e}" for d in diffs))
    assert max(diffs) <= 1e-4


# --- the sampler and the ID attention against the reference ------------------------------------------------


def reference_latents(ref, pipe, layers, tokens, mode: arch.IDMode, id_scale, guidance, seed, monkeypatch):
    """The reference PuLIDPipeline's inference on our pipeline parts; returns its final latents."""
    monkeypatch.setattr(ref.attention, "NUM_ZERO", mode.num_zero)
    monkeypatch.setattr(ref.attention, "ORTHO", mode.ortho == "v1")
    monkeypatch.setattr(ref.attention, "ORTHO_v2", mode.ortho == "v2")
    theirs = ref.pipeline.PuLIDPipeline.__new__(ref.pipeline.PuLIDPipeline)
    torch.nn.Module.__init__(theirs) if isinstance(theirs, torch.nn.Module) else None
    theirs.device = "cpu"
    theirs.pipe = pipe
    before = pipe.unet.attn_processors
    theirs.hack_unet_attn_layers(pipe.unet)
    weights = {f"{i}.{k}": v for i, row in layers.items() for k, v in row.items()}
    theirs.id_adapter_attn_layers.load_state_dict(weights, strict=True)
    # the reference's own schedule set-up (its __init__ also loads models from the hub, so it is not called)
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.tensor(np.cumprod(1.0 - betas, axis=0), dtype=torch.float32)
    theirs.sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
    theirs.log_sigmas = theirs.sigmas.log()
    theirs.sigma_data = 1.0
    captured = []

    def sampler(*args, **kwargs):
        captured.append(ref.utils.sample_dpmpp_2m(*args, **kwargs))
        return captured[-1]

    theirs.sampler = sampler
    uncond, cond = tokens
    try:
        with torch.inference_mode():
            theirs.inference("portrait photo of a woman", (1, SIZE, SIZE), "", cond, uncond, id_scale, guidance,
                             STEPS, seed)
    finally:
        pipe.unet.set_attn_processor(before)
    return captured[0]


def our_latents(parts, policy, guidance, seed, tokens=None):
    with parts.backend.attached_pulid(parts.pipe.unet, parts.models.layers, policy) as state:
        return parts.backend.render_karras(parts.pipe, "portrait photo of a woman", "", SIZE, SIZE, STEPS, guidance,
                                           seed, state, tokens or (parts.inputs.uncond, parts.inputs.cond),
                                           decode=False)


@pytest.mark.parametrize("mode", ["fidelity", "style", "plain"])
def test_karras_render_matches_reference_pipeline(ref, parts, mode, monkeypatch):
    policy = policy_of(parts, {"pulid_mode": mode, "id_scale": 0.8})

    def pulid():
        tokens = (parts.inputs.uncond, parts.inputs.cond)
        latents = reference_latents(ref, parts.pipe, parts.models.layers, tokens, policy.mode, 0.8, 2.0, 11, monkeypatch)
        return {"latents": latents, "uncond": tokens[0], "cond": tokens[1]}

    theirs = reference(f"pulid_karras_{mode}", pulid)
    uncond, cond = (torch.from_numpy(theirs[k]) for k in ("uncond", "cond"))  # the ID tokens the reference read
    assert max_diff(parts.inputs.cond, cond) <= 1e-4  # our encoders still make them
    ours = our_latents(parts, policy, 2.0, 11, tokens=(uncond, cond))
    diff = max_diff(ours, theirs["latents"])
    # The same comparison with the CFG halves' ID tokens swapped must fail: the check can see the order.
    swapped = our_latents(parts, policy, 2.0, 11, tokens=(cond, uncond))
    swap_diff = max_diff(swapped, theirs["latents"])
    print(f"{mode}: max|latent diff| vs reference {diff:.2e}; with the CFG halves swapped {swap_diff:.2e} "
          f"(latent scale {float(np.abs(theirs['latents']).max()):.2f})")
    assert diff <= TOL
    assert swap_diff > 100 * TOL


# --- invariants -------------------------------------------------------------------------------------------


def test_id_scale_zero_is_exactly_the_plain_pipeline(parts):
    for mode in ("fidelity", "style", "plain"):
        policy = policy_of(parts, {"pulid_mode": mode, "id_scale": 0.0})
        with_id = our_latents(parts, policy, 2.0, 5)
        plain = parts.backend.render_karras(parts.pipe, "portrait photo of a woman", "", SIZE, SIZE, STEPS, 2.0, 5,
                                            decode=False)
        assert torch.equal(with_id, plain), mode
    policy = policy_of(parts, {"id_scale": 0.8})
    assert not torch.equal(our_latents(parts, policy, 2.0, 5), plain)


def test_lightning_schedule_at_scale_zero_is_the_stock_pipeline(ctx_xl, person):
    from diffusers import DPMSolverMultistepScheduler

    from portrait.stages.sd import call_pipeline, load_sd_pipeline, prepare_pipeline

    request = request_for(ctx_xl, person, pulid_schedule="lightning", id_scale=0.0)
    ours = list(generate_candidates(request, ctx_xl))[0].image
    pipe = load_sd_pipeline(ctx_xl, "txt2img")
    prepare_pipeline(pipe, request, ctx_xl)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    stock = call_pipeline(pipe, request, request.seed)
    assert np.array_equal(ours, stock)
    with_id = list(generate_candidates(request_for(ctx_xl, person, pulid_schedule="lightning"), ctx_xl))[0].image
    assert not np.array_equal(with_id, stock)


def test_id_tokens_reach_exactly_the_cross_attention_layers(parts):
    """Every cross-attention processor (attn2) sees the ID tokens; no self-attention one does."""
    unet = parts.pipe.unet
    seen: dict[str, int] = {}
    policy = policy_of(parts, {})
    with parts.backend.attached_pulid(unet, parts.models.layers, policy) as state:
        procs = unet.attn_processors
        for name, proc in procs.items():
            if isinstance(proc, arch.IDAttnProcessor):
                original = proc._add_id

                def spy(out, *args, _name=name, _original=original):
                    seen[_name] = seen.get(_name, 0) + 1
                    return _original(out, *args)

                proc._add_id = spy
        parts.backend.render_karras(parts.pipe, "a face", "", SIZE, SIZE, 2, 2.0, 1, state,
                                    (parts.inputs.uncond, parts.inputs.cond), decode=False)
    names = list(procs)
    cross = {n for n in names if n.endswith("attn2.processor")}
    assert set(seen) == cross and len(cross) == len(parts.models.layers)
    assert all(count == 2 for count in seen.values())  # once per denoising step
    # the checkpoint's numbering is the index in unet.attn_processors (self-attention included)
    assert sorted(parts.models.layers) == [i for i, n in enumerate(names) if n in cross]
    assert not any(isinstance(p, arch.IDAttnProcessor) for p in unet.attn_processors.values())  # restored


def test_each_layers_weights_matter(parts):
    policy = policy_of(parts, {"pulid_mode": "plain"})
    base = our_latents(parts, policy, 2.0, 4)
    layers = {i: dict(w) for i, w in parts.models.layers.items()}
    first = min(layers)
    layers[first]["id_to_v.weight"] = layers[first]["id_to_v.weight"] * 2
    with parts.backend.attached_pulid(parts.pipe.unet, layers, policy) as state:
        changed = parts.backend.render_karras(parts.pipe, "portrait photo of a woman", "", SIZE, SIZE, STEPS, 2.0, 4,
                                              state, (parts.inputs.uncond, parts.inputs.cond), decode=False)
    assert float((changed - base).abs().max()) > 1e-4


def test_ortho_projection_matches_an_independent_formula():
    """v1 adds only what of the ID output is orthogonal (per channel, over the sequence) to the text output."""
    torch.manual_seed(1)
    state = arch.IDState()
    state.mode, state.scale = arch.IDMode(0, "v1"), 1.0
    proc = arch.IDAttnProcessor(8, 8, state)
    text, ident = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    q = torch.randn(2, 1, 5, 8)
    mixed = proc._add_id.__func__  # the method under test, fed precomputed attention outputs
    with torch.no_grad():
        proc.id_to_k.weight.zero_()
        heads = lambda t: t.view(2, -1, 1, 8).transpose(1, 2)  # noqa: E731
        merge = lambda t: t.transpose(1, 2).reshape(2, -1, 8)  # noqa: E731
        proc.id_to_v.weight.copy_(torch.eye(8))
        tokens = ident  # with zero keys, attention averages the values: every row gets mean(ident)
        out = mixed(proc, text, q, tokens, heads, merge)
    id_out = ident.mean(dim=1, keepdim=True).expand_as(text)
    expected = torch.empty_like(text)
    for b in range(2):
        for ch in range(8):
            t, i = text[b, :, ch].double(), id_out[b, :, ch].double()
            expected[b, :, ch] = (t + (i - (t @ i) / (t @ t) * t)).float()
    assert torch.allclose(out, expected, atol=1e-5)
    residual = out - text
    assert float((residual * text).sum(dim=1).abs().max()) < 1e-4  # orthogonal to the text output


def test_several_photos_modes(parts, person, ctx_xl):
    from portrait.stages import embed as emb

    rows_all = parts.backend.pulid_inputs(ctx_xl, person, parts.models, emb.EmbedPolicy("all", 4))
    rows_best = parts.backend.pulid_inputs(ctx_xl, person, parts.models, emb.EmbedPolicy("best", 4))
    rows_mean = parts.backend.pulid_inputs(ctx_xl, person, parts.models, emb.EmbedPolicy("mean", 4))
    assert len(rows_all.embedding.crops) == 2  # both photos show a face
    q = parts.models.encoder.config.num_queries
    for x in (rows_all, rows_best, rows_mean):
        assert x.cond.shape == (1, q, parts.models.encoder.config.output_dim)
        assert torch.equal(x.uncond, rows_all.uncond)  # the IDFormer on zeros, one photo's shapes
    assert not torch.allclose(rows_all.cond, rows_best.cond)
    assert not torch.allclose(rows_mean.cond, rows_best.cond)


# --- the backend end to end ---------------------------------------------------------------------------------


def test_backend_generates_and_records(ctx_xl, person):
    request = request_for(ctx_xl, person, n=2, pulid_mode="style")
    candidates = list(generate_candidates(request, ctx_xl))
    assert [c.seed for c in candidates] == [3, 4]
    assert candidates[0].image.shape == (SIZE, SIZE, 3) and candidates[0].image.std() > 0
    info = candidates[0].info
    assert info["adapter"]["mode"] == "style" and info["adapter"]["num_zero"] == 16 and info["adapter"]["ortho"] == "v1"
    assert info["embedding"]["space"] == "insightface:antelopev2" and len(info["embedding"]["photos"]) == 2
    assert info["identity_mode"] == "zero-shot"


def test_bad_options_are_refused(ctx_xl, person):
    with pytest.raises(BadInput, match="pulid_mode"):
        request_for(ctx_xl, person, pulid_mode="loud")
    with pytest.raises(BadInput, match="id_scale"):
        request_for(ctx_xl, person, id_scale=-1)


def test_pulid_runs_on_sdxl_only(tiny_home, person):
    ctx15 = RunContext.create(tiny_home, preset="tiny")
    with pytest.raises(BadInput, match="sdxl"):
        list(generate_candidates(request_for(ctx15, person), ctx15))


def test_checkpoint_detection_and_a_wrong_file(tmp_path):
    state = tiny_pulid.pulid_tiny_state(0)
    assert arch.detect(state)
    assert not arch.detect({k: v for k, v in state.items() if not k.startswith("id_adapter_attn_layers.")})
    assert not arch.detect({"image_proj.latents": torch.zeros(1)})
    encoder, _ = arch.split_state(state)
    with pytest.raises(ValueError):
        arch.build_idformer({k: v for k, v in encoder.items() if k != "latents"})
