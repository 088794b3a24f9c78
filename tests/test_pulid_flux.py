"""PuLID-FLUX v0.9.1 (backend `pulid-flux`): checked against the reference code and by invariants.

The reference runs BFL's FLUX code (flux/model.py `Flux.forward`, flux/sampling.py `denoise`),
our backend diffusers' FluxTransformer2DModel. diffusers' BFL->diffusers converter hard-codes
FLUX.1's width (inner_dim 3072), so it cannot map the tiny weights; instead the comparison
runs the reference's own `Flux.forward` and `denoise` with:
- its embedders and final layer loaded from the tiny diffusers transformer (a documented key
  map: x_embedder -> img_in, the time/guidance/text MLPs, context_embedder -> txt_in,
  norm_out.linear -> final_layer.adaLN_modulation.1 with the scale/shift halves swapped,
  proj_out -> final_layer.linear);
- its double and single stream blocks replaced by adapters around the same diffusers blocks
  (so the transformer blocks are the same code on both sides and the comparison isolates
  what PuLID adds: where the ID cross-attention goes, the reference's PerceiverAttentionCA
  loaded with the tiny checkpoint, id_weight, start_step and the true-CFG order);
- the reference `denoise` loop with the same timesteps, noise, text and ID tokens.
Latents are compared (max |diff| printed with `pytest -s`).
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
from reference_fixtures import max_diff, recording, reference
from test_embed import make_identity

SIZE = 64
STEPS = 3
TOL = 1e-4
PROMPT = "portrait photo of a woman"


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """The reference's modules when recording fixtures (tests/reference_fixtures.py), else None."""
    if not recording():
        yield None
        return
    with reference_modules(tmp_path_factory.mktemp("pulid-flux-reference"), "flux.model", "flux.sampling",
                           "pulid.encoders_transformer") as m:
        yield types.SimpleNamespace(model=m.flux_model, sampling=m.flux_sampling, encoders=m.pulid_encoders_transformer)


@pytest.fixture(scope="module")
def ctx_flux(tiny_home):
    return RunContext.create(tiny_home, preset="tiny-flux")


@pytest.fixture(scope="module")
def person(tiny_home, hopper, astronaut):
    return make_identity(tiny_home, "pulid-flux-person", [hopper, astronaut], reference=hopper)


@pytest.fixture(scope="module")
def parts(ctx_flux, person):
    from portrait.stages import embed as emb
    from portrait.stages.backends import pulid_flux as backend
    from portrait.stages.pulid_features import pulid_inputs
    from portrait.stages.sd import load_sd_pipeline

    models = backend.load_models(ctx_flux)
    inputs = pulid_inputs(ctx_flux, person, models, emb.EmbedPolicy("all", 4))
    pipe = load_sd_pipeline(ctx_flux, "txt2img")
    return types.SimpleNamespace(models=models, inputs=inputs, pipe=pipe, backend=backend)


def request_for(ctx, identity, seed=3, n=1, **options):
    policy = GeneratePolicy.from_preset(ctx.preset)
    overrides = {"width": SIZE, "height": SIZE, "steps": STEPS, "options": options}
    return resolve_request(identity, policy, template=None, prompt=PROMPT, backend="pulid-flux", n=n, seed=seed,
                           overrides=overrides)


def our_latents(parts, *, weight=1.0, tokens=None, **kwargs):
    tokens = tokens or (parts.inputs.uncond, parts.inputs.cond)
    with parts.backend.attached(parts.pipe.transformer, parts.models.ca, weight) as state, torch.inference_mode():
        return parts.backend.denoise(parts.pipe, state, tokens, prompt=PROMPT, negative="blurry", width=SIZE,
                                     height=SIZE, steps=STEPS, guidance=3.5, seed=9, max_sequence_length=128,
                                     output_type="latent", **kwargs)


# --- the reference's FLUX around the same blocks ----------------------------------------------------------


class _Double(torch.nn.Module):
    def __init__(self, block, rotary):
        super().__init__()
        self.block, self.rotary = block, rotary

    def forward(self, img, txt, vec, pe):
        txt, img = self.block(hidden_states=img, encoder_hidden_states=txt, temb=vec, image_rotary_emb=self.rotary[0])
        return img, txt


class _Single(torch.nn.Module):
    def __init__(self, block, rotary, text_len):
        super().__init__()
        self.block, self.rotary, self.text_len = block, rotary, text_len

    def forward(self, x, vec, pe):
        n = self.text_len[0]
        txt, img = self.block(hidden_states=x[:, n:], encoder_hidden_states=x[:, :n], temb=vec,
                              image_rotary_emb=self.rotary[0])
        return torch.cat([txt, img], dim=1)


def reference_flux(ref, transformer, ca_states):
    """The reference `Flux` with our tiny transformer's weights and blocks, and PuLID's CA modules."""
    c = transformer.config
    hidden = c.num_attention_heads * c.attention_head_dim
    params = ref.model.FluxParams(in_channels=c.in_channels, vec_in_dim=c.pooled_projection_dim,
                                  context_in_dim=c.joint_attention_dim, hidden_size=hidden, mlp_ratio=4.0,
                                  num_heads=c.num_attention_heads, depth=c.num_layers,
                                  depth_single_blocks=c.num_single_layers, axes_dim=list(c.axes_dims_rope),
                                  theta=10000, qkv_bias=True, guidance_embed=c.guidance_embeds)
    model = ref.model.Flux(params).eval()
    sd = transformer.state_dict()
    emb = "time_text_embed."
    scale, shift = sd["norm_out.linear.weight"].chunk(2)
    scale_b, shift_b = sd["norm_out.linear.bias"].chunk(2)
    mapped = {
        "img_in.weight": sd["x_embedder.weight"], "img_in.bias": sd["x_embedder.bias"],
        "txt_in.weight": sd["context_embedder.weight"], "txt_in.bias": sd["context_embedder.bias"],
        "final_layer.linear.weight": sd["proj_out.weight"], "final_layer.linear.bias": sd["proj_out.bias"],
        "final_layer.adaLN_modulation.1.weight": torch.cat([shift, scale]),
        "final_layer.adaLN_modulation.1.bias": torch.cat([shift_b, scale_b]),
    }
    for bfl, ours in (("time_in", "timestep_embedder"), ("guidance_in", "guidance_embedder"),
                      ("vector_in", "text_embedder")):
        for a, b in (("in_layer", "linear_1"), ("out_layer", "linear_2")):
            for p in ("weight", "bias"):
                mapped[f"{bfl}.{a}.{p}"] = sd[f"{emb}{ours}.{b}.{p}"]
    rotary, text_len = [None], [0]
    model.double_blocks = torch.nn.ModuleList(_Double(b, rotary) for b in transformer.transformer_blocks)
    model.single_blocks = torch.nn.ModuleList(_Single(b, rotary, text_len) for b in transformer.single_transformer_blocks)
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    assert not unexpected and all(k.startswith(("double_blocks.", "single_blocks.")) for k in missing), missing
    modules = []
    for w in ca_states:
        inner, dim = w["to_q.weight"].shape
        module = ref.encoders.PerceiverAttentionCA(dim=dim, dim_head=inner, heads=1, kv_dim=w["to_kv.weight"].shape[1])
        module.load_state_dict(w, strict=True)
        modules.append(module.eval())
    model.pulid_ca = torch.nn.ModuleList(modules)
    return model, rotary, text_len


def reference_latents(ref, parts, *, weight=1.0, tokens=None, start_step=0, true_cfg=1.0, timestep_to_start_cfg=1):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    from portrait.stages.sd import generator

    pipe = parts.pipe
    blocks = [dict(m.state_dict()) for m in parts.models.ca]  # the tiny checkpoint's, as loaded
    model, rotary, text_len = reference_flux(ref, pipe.transformer, blocks)
    uncond, cond = tokens or (parts.inputs.uncond, parts.inputs.cond)
    with torch.inference_mode():
        embeds, pooled, text_ids = pipe.encode_prompt(prompt=PROMPT, prompt_2=None, max_sequence_length=128)
        neg, neg_pooled, neg_ids = pipe.encode_prompt(prompt="blurry", prompt_2=None, max_sequence_length=128)
        channels = pipe.transformer.config.in_channels // 4
        latents, image_ids = pipe.prepare_latents(1, channels, SIZE, SIZE, embeds.dtype, "cpu", generator(9))
        config = pipe.scheduler.config
        mu = calculate_shift(latents.shape[1], config["base_image_seq_len"], config["max_image_seq_len"],
                             config["base_shift"], config["max_shift"])
        retrieve_timesteps(pipe.scheduler, STEPS, "cpu", sigmas=np.linspace(1.0, 1 / STEPS, STEPS), mu=mu)
        sigmas = [float(s) for s in pipe.scheduler.sigmas]
        rotary[0] = pipe.transformer.pos_embed(torch.cat([text_ids, image_ids]))
        text_len[0] = embeds.shape[1]
        return ref.sampling.denoise(model, img=latents, img_ids=image_ids[None], txt=embeds, txt_ids=text_ids[None],
                                    vec=pooled, timesteps=sigmas, guidance=3.5, id_weight=weight, id=cond,
                                    start_step=start_step, uncond_id=uncond, true_cfg=true_cfg,
                                    timestep_to_start_cfg=timestep_to_start_cfg, neg_txt=neg, neg_txt_ids=neg_ids[None],
                                    neg_vec=neg_pooled)


def test_ca_module_matches_reference(ref):
    state = tiny_pulid.pulid_flux_tiny_state(1)
    _, blocks = arch.split_flux_state(state)
    ours = arch.build_flux_ca(blocks)[0]
    inner, dim = blocks[0]["to_q.weight"].shape
    gen = torch.Generator().manual_seed(4)
    ids, image = torch.randn(2, 7, 64, generator=gen), torch.randn(2, 16, dim, generator=gen)

    def pulid():
        theirs = ref.encoders.PerceiverAttentionCA(dim=dim, dim_head=128, heads=inner // 128,
                                                   kv_dim=blocks[0]["to_kv.weight"].shape[1]).eval()
        theirs.load_state_dict(blocks[0], strict=True)
        with torch.no_grad():
            return {"out": theirs(ids, image)}

    theirs = reference("pulid_flux_ca", pulid)
    with torch.no_grad():
        diff = max_diff(ours(ids, image), theirs["out"])
    print(f"PerceiverAttentionCA max|diff| {diff:.2e}")
    assert diff <= 1e-5
    # the real file's count: 19 double and 38 single blocks take 20 modules, as the reference computes it
    assert arch.flux_ca_count(19, 38) == 20


CASES = {"default": {}, "start1": {"start_step": 1}, "cfg": {"true_cfg": 2.5},
         "cfg_start1_weight": {"true_cfg": 2.5, "start_step": 1, "timestep_to_start_cfg": 0, "weight": 0.6}}


@pytest.mark.parametrize("name", list(CASES))
def test_denoise_matches_reference_flux(ref, parts, name):
    case = CASES[name]

    def pulid():
        tokens = (parts.inputs.uncond, parts.inputs.cond)
        return {"latents": reference_latents(ref, parts, **case), "uncond": tokens[0], "cond": tokens[1]}

    theirs = reference(f"pulid_flux_denoise_{name}", pulid)
    uncond, cond = (torch.from_numpy(theirs[k]) for k in ("uncond", "cond"))  # the ID tokens the reference read
    assert max_diff(parts.inputs.cond, cond) <= 1e-4  # our encoders still make them
    ours = our_latents(parts, **case, tokens=(uncond, cond))
    diff = max_diff(ours, theirs["latents"])
    print(f"{case}: max|latent diff| vs reference {diff:.2e} (latent scale {float(np.abs(theirs['latents']).max()):.2f})")
    assert diff <= TOL
    if case:  # each option changes the result, so the agreement above covers it
        assert float((ours - our_latents(parts, tokens=(uncond, cond))).abs().max()) > 100 * TOL
    if case.get("true_cfg"):  # the check sees the order of the CFG halves' ID tokens
        swapped = our_latents(parts, **case, tokens=(cond, uncond))
        assert max_diff(swapped, theirs["latents"]) > 100 * TOL


# --- invariants -------------------------------------------------------------------------------------------


def test_id_weight_zero_is_exactly_the_plain_flux_pipeline(parts, ctx_flux, person):
    """id_weight 0 (and no ID at all) gives diffusers' own FluxPipeline image, to the bit."""
    from portrait.stages import flux

    request = request_for(ctx_flux, person, id_weight=0.0)
    ours = list(generate_candidates(request, ctx_flux))[0].image
    pipe = flux.load_flux_pipeline(ctx_flux, request)
    stock = flux.call_flux(pipe, request, ctx_flux, request.seed)
    assert np.array_equal(ours, stock)
    with_id = list(generate_candidates(request_for(ctx_flux, person), ctx_flux))[0].image
    assert not np.array_equal(with_id, stock)


def test_hooks_add_exactly_the_ca_term_on_target_blocks_only(parts):
    """Each block alone: hooked output - plain output = id_weight * ca_k(tokens, plain image output) on
    the reference's blocks (k counted double first, then single), and exactly 0 elsewhere."""
    transformer = parts.pipe.transformer
    tokens = parts.inputs.cond
    weight = 0.7
    k = 0
    torch.manual_seed(0)
    hidden = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    img, txt, temb = torch.randn(1, 16, hidden), torch.randn(1, 5, hidden), torch.randn(1, hidden)
    rotary = transformer.pos_embed(torch.zeros(21, 3))
    for kind, interval, blocks in (("double", arch.FLUX_DOUBLE_INTERVAL, transformer.transformer_blocks),
                                   ("single", arch.FLUX_SINGLE_INTERVAL, transformer.single_transformer_blocks)):
        for i, block in enumerate(blocks):
            with torch.inference_mode():
                _, plain = block(hidden_states=img, encoder_hidden_states=txt, temb=temb, image_rotary_emb=rotary)
                state = arch.FluxIDState()
                state.tokens, state.weight = tokens, weight
                handles = arch.flux_id_hooks(transformer, parts.models.ca, state)
                try:
                    _, hooked = block(hidden_states=img, encoder_hidden_states=txt, temb=temb, image_rotary_emb=rotary)
                finally:
                    for h in handles:
                        h.remove()
                if i % interval == 0:
                    expected = weight * parts.models.ca[k](tokens, plain)
                    assert torch.allclose(hooked - plain, expected, atol=1e-6), (kind, i)
                    k += 1
                else:
                    assert torch.equal(hooked, plain), (kind, i)
    assert k == len(parts.models.ca)


def test_backend_generates_and_records(ctx_flux, person):
    candidates = list(generate_candidates(request_for(ctx_flux, person, n=2, true_cfg=2.0, start_step=1), ctx_flux))
    assert [c.seed for c in candidates] == [3, 4] and candidates[0].image.shape == (SIZE, SIZE, 3)
    info = candidates[0].info
    assert info["adapter"]["true_cfg"] == 2.0 and info["adapter"]["start_step"] == 1
    assert info["embedding"]["space"] == "insightface:antelopev2" and len(info["embedding"]["photos"]) == 2


def test_bad_inputs(ctx_flux, person, tiny_home):
    with pytest.raises(BadInput, match="id_weight"):
        request_for(ctx_flux, person, id_weight=-1)
    ctx_xl = RunContext.create(tiny_home, preset="tiny-sdxl")
    with pytest.raises(BadInput, match="flux"):
        list(generate_candidates(request_for(ctx_xl, person), ctx_xl))


def test_checkpoint_detection():
    state = tiny_pulid.pulid_flux_tiny_state(0)
    assert arch.detect_flux(state) and not arch.detect(state)
    assert not arch.detect_flux(tiny_pulid.pulid_tiny_state(0))
    with pytest.raises(ValueError):
        arch.split_flux_state({**state, "pulid_ca.5.to_q.weight": torch.zeros(1)})
