"""Training precision on CPU (issue 16): bf16 where the CPU has bf16 instructions, the UNet read
from disk straight into bf16, and trainers of different precisions in one process."""

from __future__ import annotations

import dataclasses
import json
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from portrait.core.cache import ModelCache
from portrait.core.config import Settings, load_preset
from portrait.core.context import RunContext
from portrait.core.device import cpu_bf16_native
from portrait.core.errors import BadInput
from portrait.core.archs.diffusers import diffusers_part
from portrait.core.formats import weights
from portrait.stages import train_run
from portrait.stages.train import TrainData, TrainModels, TrainPolicy, load_dtypes, mixed_precision_for, train_lora


@pytest.fixture()
def home(own_home) -> Settings:
    return own_home


def pipeline(settings: Settings, dtypes=None):
    from portrait.core.loaders import load_pipeline

    ctx = RunContext.create(settings, preset="tiny")
    return load_pipeline(dataclasses.replace(ctx, cache=ModelCache()), dtypes=dtypes)


def crops(astronaut, hopper) -> TrainData:
    images = tuple(np.asarray(Image.fromarray(x).resize((64, 64), Image.LANCZOS))
                   for x in (astronaut[0:300, 100:400], hopper[100:400, 100:400]))
    return TrainData(images, ("a photo of sks person",) * 2, "sks", "person")


def policy(**overrides) -> TrainPolicy:
    base = {"steps": 4, "checkpoint_every": 2, "validation_seeds": [], "train_text_encoder": False}
    return TrainPolicy.from_section(load_preset("tiny").section("train"), **{**base, **overrides})


# --- the safetensors reader -------------------------------------------------------------


def test_streamed_reader_equals_safetensors_and_converts_only_floats(tmp_path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    state = {"w32": torch.randn(3, 5), "w16": torch.randn(4).half(), "wbf": torch.randn(2, 2).bfloat16(),
             "ids": torch.arange(6).reshape(2, 3), "scalar": torch.tensor(1.5), "empty": torch.zeros(0, 3)}
    path = tmp_path / "w.safetensors"
    save_file(state, str(path), metadata={"format": "pt"})
    reference = load_file(str(path))
    read = dict(weights.iter_safetensors(path))
    assert read.keys() == reference.keys()
    for name, tensor in reference.items():
        assert read[name].dtype == tensor.dtype and read[name].shape == tensor.shape and torch.equal(read[name], tensor)
    as_bf16 = dict(weights.iter_safetensors(path, torch.bfloat16))
    for name in ("w32", "w16", "wbf", "scalar", "empty"):
        assert as_bf16[name].dtype == torch.bfloat16
        assert torch.equal(as_bf16[name], reference[name].to(torch.bfloat16))
    assert as_bf16["ids"].dtype == torch.int64  # integers are never converted
    assert weights.stored_dtypes([weights.safetensors_header(path)[0]]) == {"float32", "float16", "bfloat16"}


def test_damaged_weights_files_are_one_line_naming_the_file(tmp_path):
    from safetensors.torch import save_file

    good = tmp_path / "good.safetensors"
    save_file({"w": torch.ones(1000)}, str(good))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(BadInput, match=r"cut\.safetensors: is truncated"):
        dict(weights.iter_safetensors(cut))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(struct.pack("<Q", 5) + b"{nope")
    with pytest.raises(BadInput, match=r"garbage\.safetensors: cannot be read as safetensors"):
        weights.safetensors_header(garbage)
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\x01")
    with pytest.raises(BadInput, match=r"short\.safetensors"):
        weights.safetensors_header(short)


def test_folder_weight_files_finds_single_file_variant_and_shards(tmp_path):
    assert weights.folder_weight_files(tmp_path) is None
    (tmp_path / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"")
    assert weights.folder_weight_files(tmp_path, "fp16") == [tmp_path / "diffusion_pytorch_model.fp16.safetensors"]
    index = {"weight_map": {"a": "diffusion_pytorch_model-00002-of-00002.safetensors",
                            "b": "diffusion_pytorch_model-00001-of-00002.safetensors"}}
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    assert [p.name for p in weights.folder_weight_files(tmp_path)] == [
        "diffusion_pytorch_model-00001-of-00002.safetensors", "diffusion_pytorch_model-00002-of-00002.safetensors"]


def test_unet_loaded_as_bf16_tensor_by_tensor_equals_from_pretrained(tiny_home, monkeypatch):
    from diffusers import UNet2DConditionModel

    from portrait.core import loaders

    folder = tiny_home.models_dir / "tiny-sd15" / "unet"
    reads = []
    real = weights.iter_safetensors
    monkeypatch.setattr(weights, "iter_safetensors", lambda *a, **k: reads.append(a[0]) or real(*a, **k))
    streamed = diffusers_part(UNet2DConditionModel, folder, torch.bfloat16, None)
    assert reads, "the fp32 file was not read tensor by tensor"
    reference = UNet2DConditionModel.from_pretrained(folder, torch_dtype=torch.bfloat16)
    a, b = streamed.state_dict(), reference.state_dict()
    assert a.keys() == b.keys()
    assert all(a[k].dtype == torch.bfloat16 and torch.equal(a[k], b[k]) for k in a)
    assert not any(t.is_meta for t in (*streamed.parameters(), *streamed.buffers()))
    assert not streamed.training
    torch.manual_seed(0)
    sample, cond = torch.randn(1, 4, 8, 8, dtype=torch.bfloat16), torch.randn(1, 77, 32, dtype=torch.bfloat16)
    cond = cond[..., : reference.config.cross_attention_dim]
    with torch.no_grad():
        assert torch.equal(streamed(sample, 10, cond).sample, reference(sample, 10, cond).sample)
    # Same dtype as stored: diffusers' own from_pretrained, untouched.
    reads.clear()
    diffusers_part(UNet2DConditionModel, folder, torch.float32, None)
    assert not reads


# --- the precision rule ----------------------------------------------------------------


def test_cpu_bf16_flags_and_the_auto_rule(monkeypatch):
    assert cpu_bf16_native("processor : 0\nflags : fpu avx512f avx512_bf16 avx512_vnni\n")
    assert cpu_bf16_native("flags : fpu amx_bf16 amx_tile\n")
    assert cpu_bf16_native("Features : fp asimd bf16 i8mm\n")  # Arm
    assert not cpu_bf16_native("flags : fpu avx2 avx512f\n")
    assert not cpu_bf16_native("")

    auto = TrainPolicy(mixed_precision="auto")
    monkeypatch.setattr(train_run, "cpu_bf16_native", lambda: True)
    assert mixed_precision_for(auto, "cpu", "float32") == "bf16"
    assert load_dtypes(auto, "cpu", "float32") == {"unet": "bfloat16", "transformer": "bfloat16",
                                                   "text_encoder": "bfloat16", "text_encoder_2": "bfloat16"}
    # A UNet handed in already loaded: auto follows it, never rounding an fp32 pipeline in place.
    assert mixed_precision_for(auto, "cpu", "float32", unet_dtype=torch.float32) == "no"
    assert mixed_precision_for(auto, "cpu", "float32", unet_dtype=torch.bfloat16) == "bf16"
    assert load_dtypes(TrainPolicy(mixed_precision="no"), "cpu", "float32") == {}
    monkeypatch.setattr(train_run, "cpu_bf16_native", lambda: False)
    assert mixed_precision_for(auto, "cpu", "float32") == "no" and load_dtypes(auto, "cpu", "float32") == {}
    assert mixed_precision_for(TrainPolicy(mixed_precision="bf16"), "cpu", "float32") == "bf16"
    with pytest.raises(BadInput, match="--mixed-precision fp16: needs a CUDA device"):
        mixed_precision_for(TrainPolicy(mixed_precision="fp16"), "cpu", "float32")
    assert load_preset("tiny").section("train")["mixed_precision"] == "no"  # tiny models: fp32 is faster
    assert "mixed_precision" not in load_preset("sd15").section("train")  # real bases: auto


# --- training in bf16 -------------------------------------------------------------------


def test_fp32_and_bf16_trainers_share_a_process_and_bf16_resumes_exactly(home, tmp_path, astronaut, hopper):
    """accelerate's Accelerator refused a second precision in one process; the bf16 run, loaded
    as bf16 the way the train flow loads it, resumes bit-identically from its checkpoint."""
    data = crops(astronaut, hopper)
    given = pipeline(home)
    fp32 = train_lora(TrainModels("sd15", given), data, policy(mixed_precision="no"), tmp_path / "fp32")
    assert fp32.params["precision"] == "no"

    bf16_policy = policy(mixed_precision="bf16")
    dtypes = load_dtypes(bf16_policy, "cpu", "float32")
    pipe = pipeline(home, dtypes)
    assert pipe.unet.dtype == torch.bfloat16 and pipe.text_encoder.dtype == torch.bfloat16
    assert pipe.vae.dtype == torch.float32  # the VAE encodes in fp32
    whole = train_lora(TrainModels("sd15", pipe), data, bf16_policy, tmp_path / "whole")
    assert whole.params["precision"] == "bf16" and all(np.isfinite(whole.losses))
    assert all(t.dtype == torch.float32 for t in whole.lora["unet"].values())  # the LoRA trains in fp32
    assert whole.losses != fp32.losses

    class Stop(Exception):
        pass

    def stop_after_first_checkpoint(event):
        if event.phase == "step" and event.step == 3:
            raise Stop

    with pytest.raises(Stop):
        train_lora(TrainModels("sd15", pipeline(home, dtypes)), data, bf16_policy, tmp_path / "cut",
                   on_event=stop_after_first_checkpoint)
    resumed = train_lora(TrainModels("sd15", pipeline(home, dtypes)), data, bf16_policy, tmp_path / "cut", resume=True)
    assert resumed.resumed_from == 2 and resumed.losses == whole.losses
    for name, tensor in whole.lora["unet"].items():
        assert torch.equal(resumed.lora["unet"][name], tensor)
    # The same interrupted run resumed in fp32 would mix precisions: refused, one line.
    with pytest.raises(BadInput, match="--resume with different"):
        train_lora(TrainModels("sd15", pipeline(home)), data, policy(mixed_precision="no"), tmp_path / "cut",
                   resume=True)


def test_explicit_bf16_on_a_handed_in_fp32_pipeline_gives_it_back_in_fp32(home, tmp_path, astronaut, hopper):
    pipe = pipeline(home)
    train_lora(TrainModels("sd15", pipe), crops(astronaut, hopper), policy(mixed_precision="bf16"), tmp_path / "w")
    assert pipe.unet.dtype == torch.float32 and pipe.text_encoder.dtype == torch.float32
    out = pipe("a photo of sks person", num_inference_steps=2, height=64, width=64,
               generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert np.isfinite(out).all()


def test_cli_trains_in_bf16_end_to_end(home, tmp_path, capsys):
    from portrait.cli.main import run
    from portrait.core.bundle import load_identity
    from portrait.samples import write_sample_photos

    photos = tmp_path / "photos"
    photos.mkdir()
    write_sample_photos(photos)
    code = run(["--home", str(home.home), "--preset", "tiny", "--device", "cpu", "train", str(photos), "--name", "bea",
                "--mixed-precision", "bf16", "--steps", "4"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "bf16 (LoRA weights in fp32)" in out.out  # the summary says what the run trained in
    identity = load_identity(home, "bea")
    lora = identity.lora_for("sd15")
    assert lora is not None and lora.path.is_file()
    params = identity.manifest["train"]["params"]
    assert params["precision"] == "bf16" and params["policy"]["mixed_precision"] == "bf16"


def test_fp16_gradscaler_path_runs_on_the_cpu():
    """The trainer's fp16 branch (stages/train.optimize) with torch's GradScaler on the CPU: the
    loss is scaled, gradients unscaled before clipping, a step whose gradients overflow is
    skipped and the scale backs off; the next finite step updates the weights."""
    from types import SimpleNamespace

    import torch

    from portrait.stages.train import Precision, optimize

    precision = Precision("cpu", "fp16")
    assert precision.scaler is not None
    weight = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    run = SimpleNamespace(precision=precision, trained_params=[weight], optimizer=optimizer,
                          policy=SimpleNamespace(max_grad_norm=1.0),
                          lr_scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0))
    scale = precision.scaler.get_scale()
    optimize(run, (weight * 2).sum())
    first = weight.detach().clone()
    assert (first < 1).all()  # unscaled and clipped: a normal SGD step
    optimize(run, (weight * float("inf")).sum())
    assert torch.equal(weight.detach(), first)  # the overflowing step was skipped
    assert precision.scaler.get_scale() < scale  # and the scale backed off
    optimize(run, weight.sum())
    assert (weight.detach() < first).all() and weight.grad is None
