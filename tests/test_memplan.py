"""The memory plan under simulated CUDA budgets (no GPU): torch.cuda's queries are patched, so
the same code that runs on a user's card decides here, before anything loads."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from portrait.core import memplan as mp
from portrait.core.config import Settings
from portrait.core.context import RunContext
from portrait.core.errors import BadInput
from portrait.stages import planning

GIB = 2**30


def simulate_cuda(monkeypatch, total_gb: float, *, free_gb: float | None = None, bf16: bool = True,
                  name: str = "Simulated GPU", major: int = 8) -> None:
    """A CUDA device as torch reports it: memory, name, bf16 support; nothing real behind it."""
    free = (free_gb if free_gb is not None else total_gb - 0.4) * GIB
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index=0: (int(free), int(total_gb * GIB)))
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index=0: SimpleNamespace(name=name, total_memory=int(total_gb * GIB), major=major))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(mp, "host_ram_bytes", lambda: 64.0 * GIB)


@pytest.fixture
def home(tmp_path_factory):
    return Settings(home=tmp_path_factory.mktemp("planhome"), device="cpu")


def cuda_ctx(home, preset: str) -> RunContext:
    return RunContext.create(dataclasses.replace(home, device="cuda"), preset=preset)


# --- the Done-when cases ------------------------------------------------------------------------


def test_flux_infusenet_on_24gb_is_offloaded_or_int8(monkeypatch, home):
    simulate_cuda(monkeypatch, 24)
    ctx = cuda_ctx(home, "flux")
    assert ctx.placement.dtype_name == "bfloat16"
    plan = planning.plan_request_for(ctx, "infiniteyou", 1024, 1024)
    names = {p.part.name for p in plan.parts}
    assert {"transformer", "text_encoder_2", "infusenet:infiniteyou-aes", "onnx:antelopev2"} <= names
    assert plan.fits and (plan.offload or plan.quantize)
    assert plan.strategy != "resident"
    # FLUX's bf16 weights alone are past 24 GB: resident cannot be the answer
    assert plan.weights > 24 * GIB
    assert plan.peak <= plan.budget
    # with int8 asked for by the preset, the transformer, T5 and InfuseNet are 8-bit
    int8 = planning.plan_request_for(dataclasses.replace(ctx, preset=_with_runtime(ctx.preset, quantize="int8")),
                                     "infiniteyou", 1024, 1024)
    assert int8.quantize["transformer"] == "int8" and int8.quantize["infusenet:infiniteyou-aes"] == "int8"
    assert int8.weights < plan.weights * 0.6


def _with_runtime(preset, **runtime):
    sections = {**preset.sections, "runtime": {**preset.sections.get("runtime", {}), **runtime}}
    return dataclasses.replace(preset, sections=sections)


def test_nothing_is_placed_on_cuda_before_the_plan(monkeypatch, home, tmp_path):
    """The real generate flow on a simulated 24 GB card: the plan is made before any module or
    tensor is moved to CUDA (the first move is stopped: there is no GPU behind it)."""
    from portrait.flows.generate import generate

    identity = _tiny_identity(home)
    simulate_cuda(monkeypatch, 24)
    events: list[str] = []

    class Reached(Exception):
        pass

    real_make = mp.make_plan

    def make_plan(*args, **kwargs):
        events.append("plan")
        return real_make(*args, **kwargs)

    def to_guard(original):
        def to(self, *args, **kwargs):
            target = kwargs.get("device", args[0] if args else None)
            if isinstance(target, (str, torch.device)) and str(target).startswith("cuda"):
                events.append("cuda")
                raise Reached()
            return original(self, *args, **kwargs)
        return to

    monkeypatch.setattr(mp, "make_plan", make_plan)
    monkeypatch.setattr(torch.nn.Module, "to", to_guard(torch.nn.Module.to))
    monkeypatch.setattr(torch.Tensor, "to", to_guard(torch.Tensor.to))
    ctx = cuda_ctx(home, "tiny")
    with pytest.raises(Reached):
        generate(identity, prompt="a portrait of {trigger}", backend="faceid", n=1, seed=1, out=tmp_path / "out",
                 ctx=ctx, finish=False)
    assert events[0] == "plan" and "cuda" in events


def _tiny_identity(home):
    from portrait.flows.train import train
    from portrait.samples import write_sample_photos

    photos = write_sample_photos(Path(home.home) / "photos", bad_file=False)
    return train(photos, name="plan-person", settings=home, preset="tiny", zero_shot=True).name


def test_sdxl_instantid_on_12gb_offloads_the_right_modules(monkeypatch, home):
    simulate_cuda(monkeypatch, 12)
    ctx = cuda_ctx(home, "sdxl")
    plan = planning.plan_request_for(ctx, "instantid", 1024, 1024)
    assert plan.fits and plan.dtype == "float16"
    assert plan.strategy in ("model_offload", "group_offload")
    where = {p.part.name: p.where for p in plan.parts}
    # the pipeline's parts move in and out; the face pack stays on the card
    for name in ("unet", "text_encoder", "text_encoder_2", "vae", "controlnet:instantid-controlnet"):
        assert where[name] == "offload", name
    assert where["onnx:antelopev2"] == "cuda"
    # the same request on a 24 GB card stays resident
    simulate_cuda(monkeypatch, 24)
    assert planning.plan_request_for(ctx, "instantid", 1024, 1024).strategy == "resident"


def test_bf16_only_family_on_a_card_without_bf16_is_refused_in_one_line(monkeypatch, home):
    simulate_cuda(monkeypatch, 16, bf16=False, name="Tesla T4", major=7)
    monkeypatch.setattr(mp, "host_ram_bytes", lambda: 2.0 * GIB)  # no room to offload fp32 weights
    ctx = cuda_ctx(home, "flux")
    assert ctx.placement.dtype_name == "float32"  # never fp16 for FLUX
    plan = planning.plan_request_for(ctx, "flux", 1024, 1024)
    assert not plan.fits and plan.dtype == "float32"
    line = plan.refusal
    assert "\n" not in line and "fp32" in line and ("smallest card" in line or "fits no single card" in line)
    # an explicit fp16 for FLUX is refused before any plan
    with pytest.raises(BadInput, match="runs in bf16 or fp32 only") as caught:
        RunContext.create(dataclasses.replace(home, device="cuda"),
                          preset=str(_preset_file(home, "flux", precision="fp16")))
    assert "\n" not in str(caught.value)
    # SD families do run in fp16: a card without bf16 gets fp16
    assert cuda_ctx(home, "sdxl").placement.dtype_name == "float16"


def _preset_file(home, parent: str, **runtime) -> Path:
    path = Path(home.home) / f"{parent}-{'-'.join(runtime.values())}.yaml"
    path.write_text(json.dumps({"extends": parent, "runtime": runtime}))
    return path


def test_fp32_offload_where_it_fits(monkeypatch, home):
    """A bf16-only family on a card without bf16 is planned in fp32 where that fits."""
    simulate_cuda(monkeypatch, 16, bf16=False, name="Tesla T4", major=7)
    monkeypatch.setattr(mp, "host_ram_bytes", lambda: 256.0 * GIB)
    plan = planning.plan_request_for(cuda_ctx(home, "flux"), "flux", 512, 512)
    assert plan.fits and plan.dtype == "float32" and plan.offload
    assert any("planned in fp32" in n for n in plan.notes)


def test_refusal_names_the_smallest_card(monkeypatch, home):
    simulate_cuda(monkeypatch, 8)
    monkeypatch.setattr(mp, "host_ram_bytes", lambda: 8.0 * GIB)  # no room to offload FLUX's weights
    plan = planning.plan_request_for(cuda_ctx(home, "flux"), "infiniteyou", 1024, 1024)
    if plan.fits:  # int4 quantization may make it fit; it must then say so
        assert plan.quantize
    else:
        assert "smallest card it fits is" in plan.refusal and "\n" not in plan.refusal


def test_quantize_step_comes_after_offload_and_before_refusal():
    parts = [mp.Part("transformer", "m", "denoiser", 12_000_000_000, "config", True, 50_000_000),
             mp.Part("text_encoder_2", "m", "text", 4_700_000_000, "config", True, 130_000_000),
             mp.Part("vae", "m", "vae", 84_000_000, "config")]
    req = mp.Request("flux", "flux", 1024, 1024)
    roomy = mp.make_plan(parts, req, mp.Budget.card(80))
    assert roomy.strategy == "resident" and not roomy.quantize
    offload = mp.make_plan(parts, req, mp.Budget.card(24, host_ram_gb=128))
    assert offload.strategy in ("model_offload", "group_offload") and not offload.quantize
    # no host RAM for offloaded weights: the largest part is quantized instead
    tight = mp.make_plan(parts, req, mp.Budget.card(24, host_ram_gb=4))
    assert tight.fits and tight.strategy == "resident" and tight.quantize.get("transformer") == "int8"


# --- predicted footprints against measured bytes --------------------------------------------------


def test_tiny_footprint_within_10_percent_of_measured(home):
    """The plan's bytes for the tiny base (from safetensors headers) against the loaded modules'."""
    from portrait.core.loaders import load_components

    ctx = RunContext.create(home, preset="tiny")
    parts = {p.name: p for p in planning.request_parts(ctx, "lora")}
    components = load_components(ctx)
    for name in ("unet", "text_encoder", "vae"):
        module = components[name]
        measured = sum(p.numel() * p.element_size() for p in module.parameters())
        predicted = parts[name].weight_bytes("float32")
        assert abs(predicted - measured) <= 0.10 * measured, (name, predicted, measured)


def test_sd15_architecture_footprint_within_10_percent_of_the_real_files(home):
    """SD1.5's parts from its shipped configs (meta device) against the bytes of the real fp16
    files the registry records (stable-diffusion-v1-5 at its pinned revision)."""
    ctx = RunContext.create(home, preset="sd15")
    parts = {p.name: p for p in planning.base_parts(ctx, "sd15", "sd15", None)}
    assert all(p.source in ("config", "registry") for p in parts.values())
    spec = ctx.registry.get("sd15")
    files = {"unet": "unet/diffusion_pytorch_model.fp16.safetensors",
             "text_encoder": "text_encoder/model.fp16.safetensors",
             "vae": "vae/diffusion_pytorch_model.fp16.safetensors"}
    for name, file in files.items():
        measured = spec.sizes[file]
        predicted = mp.config_count(str(planning._shipped_config("sd15", name))).params * 2
        assert abs(predicted - measured) <= 0.10 * measured, (name, predicted, measured)
        assert abs(parts[name].weight_bytes("float16") - measured) <= 0.10 * measured


def test_header_counts_read_no_tensor(tmp_path):
    from safetensors.torch import save_file

    save_file({"a.weight": torch.zeros(3, 4, dtype=torch.float16), "b": torch.zeros(5)}, str(tmp_path / "w.safetensors"))
    counts = mp.header_counts(tmp_path / "w.safetensors")[""]
    assert counts.params == 17 and counts.largest == 12 and counts.source == "header"
    split = mp.header_counts(tmp_path / "w.safetensors", {"a": ["a."], "b": ["b"]})
    assert split["a"].params == 12 and split["a"].dtype == "fp16" and split["b"].params == 5


# --- `portrait plan` ---------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["sd15", "sdxl", "flux", "commercial", "klein-4b", "zimage", "qwen-edit"])
def test_plan_answers_for_every_backend_without_weights(home, preset):
    from portrait.flows.plan import plan
    from portrait.stages.backends import BACKENDS

    family = RunContext.create(home, preset=preset).preset.family
    for spec in BACKENDS.specs():
        if family not in spec.families:
            continue
        report = plan(preset=preset, backend=spec.name, settings=home, host_ram_gb=64)
        assert len(report.plans) == len(mp.CARDS_GB)
        assert all(p.peak > 0 and (p.fits or p.refusal) for p in report.plans)
        assert report.plans[-1].fits, (preset, spec.name)  # every backend fits an 80 GB card
        assert all(p.part.params > 0 for p in report.plans[-1].parts), \
            [p.part.name for p in report.plans[-1].parts if p.part.params == 0]
        # a backend that brings its own base is planned with it (kontext: FLUX.1 Kontext, not FLUX.1-dev)
        if spec.name == "kontext":
            assert {p.part.model_id for p in report.plans[-1].parts if p.part.role == "denoiser"} == {"flux-kontext"}


def test_plan_cli(home, capsys):
    from portrait.cli.main import run

    code = run(["--home", str(home.home), "--preset", "flux", "plan", "--backend", "infiniteyou", "--size", "1024x1024",
                "--vram", "24", "--ram", "64", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["plans"][0]["card"] == "24 GB card" and out["plans"][0]["fits"]
    assert out["plans"][0]["strategy"] != "resident"
    code = run(["--home", str(home.home), "--preset", "flux", "plan", "--size", "12x12"])
    err = capsys.readouterr().err
    assert code == 2 and "--size" in err and len(err.strip().splitlines()) == 1
    code = run(["--home", str(home.home), "--preset", "sd15", "plan", "--backend", "infiniteyou"])
    assert code == 2 and "runs on flux" in capsys.readouterr().err


# --- finishing models in the plan --------------------------------------------------------------------


def test_finishing_models_are_in_the_plan_and_on_the_card(monkeypatch, home):
    """What finishing loads after generation (face analysis, parser, upscaler, restorer, scoring
    CLIP) shares the card with the generation the gate reruns: it is in the plan, on the device
    under every strategy, counted once when the backend already loads it (InstantID's antelopev2)."""
    from portrait.flows.finish import FinishPolicy, FinishSwitches, finishing_plan

    simulate_cuda(monkeypatch, 12)
    ctx = cuda_ctx(home, "sdxl")
    policy = FinishPolicy.from_preset(ctx.preset)
    switches = FinishSwitches(restore=True)
    finishing = finishing_plan(ctx, switches, policy)
    # the preset's roles, as _prepare loads them (x2 upscaler for the default 2x outscale)
    assert {"face-parsing-bisenet", "realesrgan-x2plus", "gfpgan-v1.4", "clip-vit-large-patch14"} <= set(finishing.models)
    bare = planning.plan_request_for(ctx, "instantid", 1024, 1024)
    plan = planning.plan_request_for(ctx, "instantid", 1024, 1024, finishing=finishing)
    placed = {p.part.name: p for p in plan.parts}
    for name in ("finish:realesrgan-x2plus", "finish:gfpgan-v1.4", "finish:clip-vit-large-patch14"):
        assert placed[name].where == "cuda" and placed[name].part.role == "finish", name
    assert placed["finish:gfpgan-v1.4"].dtype == "float32"  # spandrel runs GFPGAN in fp32
    assert plan.weights > bare.weights and plan.peak > bare.peak
    # the InstantID face pack is the backend's already: one part, whoever else asks for it
    again = planning.plan_request_for(ctx, "instantid", 1024, 1024,
                                      finishing=dataclasses.replace(finishing, models=("antelopev2",) + finishing.models))
    assert [p.part.name for p in again.parts].count("onnx:antelopev2") == 1


def test_untiled_upscaling_is_planned_by_its_activations(monkeypatch, home):
    """Upscaling a 1024 px image in one pass holds 64-channel maps at 4096 px: the plan counts it
    (and a tiled run's few hundred MB), so turning tiling off can move a request to offload."""
    simulate_cuda(monkeypatch, 24)
    ctx = cuda_ctx(home, "sdxl")
    tiled = planning.Finishing(("realesrgan-x4plus",), upscale_scale=4, tile=256, overlap=16)
    whole = dataclasses.replace(tiled, tile=0)
    assert tiled.activation(1024, 1024) < 1 * GIB < 4 * GIB < whole.activation(1024, 1024)
    a = planning.plan_request_for(ctx, "instantid", 1024, 1024, finishing=tiled)
    b = planning.plan_request_for(ctx, "instantid", 1024, 1024, finishing=whole)
    assert b.peak > a.peak
    cpu = mp.make_plan([], mp.Request("sdxl", "x", 1024, 1024, finish_activation=whole.activation(1024, 1024)),
                       mp.Budget("cpu", 64 * GIB, 64 * GIB))
    assert cpu.peak >= whole.activation(1024, 1024) * 2  # fp32 on the CPU


def test_generate_plans_its_finishing_and_no_finish_does_not(home):
    """The generate flow hands its finishing to the plan (results.json records it); --no-finish
    plans generation alone; `portrait plan --no-finish` likewise."""
    from portrait.flows.plan import plan

    with_finish = plan(preset="sdxl", backend="instantid", settings=home, vram=12, host_ram_gb=64)
    without = plan(preset="sdxl", backend="instantid", settings=home, vram=12, host_ram_gb=64, finish=False)
    names = {p.part.name for p in with_finish.plans[0].parts}
    assert "finish:clip-vit-large-patch14" in names and "finish:realesrgan-x2plus" in names
    assert not any(p.part.role == "finish" for p in without.plans[0].parts)
    assert with_finish.plans[0].peak > without.plans[0].peak
