"""Identity training (issue 4): the trainer, its exports, resume after SIGKILL, the bundle and the CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from portrait.core.bundle import load_identity
from portrait.core.cache import ModelCache
from portrait.core.config import Settings, load_preset
from portrait.core.context import RunContext
from portrait.core.errors import BadInput
from portrait.core.formats.lora import read_safetensors
from portrait.stages.train import (
    CheckpointRecord,
    TrainData,
    TrainModels,
    TrainPolicy,
    TrainResult,
    average_states,
    choose_checkpoints,
    kohya_state,
    optimize,
    result_summary,
    save_diffusers_lora,
    save_kohya_lora,
    score_images,
    setup_training,
    step_loss,
    train_lora,
)


# --- fixtures -------------------------------------------------------------------------


@pytest.fixture()
def home(own_home) -> Settings:
    return own_home


def fresh_pipeline(settings: Settings, preset: str = "tiny"):
    """A pipeline not shared through any cache (the trainer adds adapters to it)."""
    from portrait.core.loaders import load_pipeline

    ctx = RunContext.create(settings, preset=preset)
    return load_pipeline(dataclasses.replace(ctx, cache=ModelCache()))


def crops(astronaut, hopper) -> TrainData:
    from skimage import data

    images = tuple(np.asarray(Image.fromarray(x).resize((64, 64), Image.LANCZOS))
                   for x in (astronaut[0:300, 100:400], hopper[100:400, 100:400], data.chelsea()[0:300, 0:300]))
    return TrainData(images, ("a photo of sks person",) * 3, "sks", "person")


def tiny_policy(preset: str = "tiny", **overrides) -> TrainPolicy:
    return TrainPolicy.from_section(load_preset(preset).section("train"), **overrides)


def render(pipe) -> np.ndarray:
    out = pipe("a photo of sks person", num_inference_steps=2, height=64, width=64,
               generator=torch.Generator().manual_seed(0), output_type="np")
    return out.images[0]


# --- policy and selection (pure) -------------------------------------------------------


def test_policy_steps_follow_photo_count_and_overrides():
    policy = TrainPolicy.from_section(load_preset("sd15").section("train"))
    assert (policy.rank, policy.alpha, policy.selection) == (64, 32, "average")
    assert policy.total_steps(2) == 300 and policy.total_steps(5) == 500 and policy.total_steps(15) == 800
    assert TrainPolicy.from_section({}, steps=7, rank=3).total_steps(10) == 7
    assert tiny_policy().checkpoint_steps(10) == [4, 8, 10]
    xl = TrainPolicy.from_section(load_preset("sdxl").section("train"))
    assert xl.resolution == 1024 and not xl.train_text_encoder
    with pytest.raises(BadInput, match="unknown key .bogus. \\(known: alpha, batch_size"):
        TrainPolicy.from_section({"bogus": 1})
    with pytest.raises(BadInput, match="--rank 0"):
        TrainPolicy.from_section({}, rank=0)


def test_selection_averages_checkpoints_behind_best_images_and_no_face_scores_zero(tmp_path):
    assert score_images([np.zeros((8, 8, 3), np.uint8)] * 2, lambda image: None) == (0.0, 0.0)
    assert score_images([np.zeros((8, 8, 3), np.uint8)], lambda image: 0.7) == (0.7,)
    records = [CheckpointRecord(4, tmp_path, 1.0, (0.1, 0.2)), CheckpointRecord(8, tmp_path, 0.9, (0.9, 0.3)),
               CheckpointRecord(12, tmp_path, 0.8, (0.8, 0.05))]
    policy = TrainPolicy(select_top_images=2)
    how, chosen = choose_checkpoints(records, policy)
    assert how == "average" and [r.step for r in chosen] == [8, 12]
    how, chosen = choose_checkpoints(records, dataclasses.replace(policy, selection="best"))
    assert how == "best" and [r.step for r in chosen] == [8]
    faceless = [dataclasses.replace(r, scores=(0.0,)) for r in records]
    assert choose_checkpoints(faceless, policy)[0] == "last"
    a = {"unet": {"w": torch.ones(2)}}
    b = {"unet": {"w": torch.full((2,), 3.0)}}
    assert torch.equal(average_states([a, b])["unet"]["w"], torch.full((2,), 2.0))


# --- the trainer on tiny models --------------------------------------------------------


def test_loss_goes_down_overfitting_a_fixed_batch(home, astronaut, hopper):
    policy = tiny_policy(learning_rate=1e-2, text_encoder_lr=1e-2)
    run = setup_training(TrainModels("sd15", fresh_pipeline(home)), crops(astronaut, hopper), policy, total=100)
    run.models.unet.train()
    losses = []
    for _ in range(12):
        loss = step_loss(run, 0)  # step 0 every time: the same latents, noise and timestep
        optimize(run, loss)
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.95 * losses[0], losses
    assert sum(b < a for a, b in zip(losses, losses[1:])) >= 10, losses


@pytest.mark.parametrize("preset,family", [("tiny", "sd15"), pytest.param("tiny-sdxl", "sdxl", marks=pytest.mark.slow)])
def test_saved_lora_loads_in_diffusers_and_kohya_file_gives_the_same_output(home, tmp_path, astronaut, hopper,
                                                                            preset, family):
    policy = tiny_policy(preset, steps=3, learning_rate=1e-2, text_encoder_lr=1e-2, train_text_encoder=True,
                         validation_seeds=[])
    pipe = fresh_pipeline(home, preset)
    result = train_lora(TrainModels(family, pipe), crops(astronaut, hopper), policy, tmp_path / "work")
    trained = render(pipe)
    assert set(result.lora) == ({"unet", "text_encoder", "text_encoder_2"} if family == "sdxl" else {"unet", "text_encoder"})

    peft_file = save_diffusers_lora(tmp_path / "out" / "lora.safetensors", family, result.lora, result.rank, result.alpha)
    kohya_file = save_kohya_lora(tmp_path / "out" / "lora_kohya.safetensors", family, result.lora, result.alpha)
    base = render(fresh_pipeline(home, preset))
    loaded = fresh_pipeline(home, preset)
    loaded.load_lora_weights(str(peft_file))
    from_peft = render(loaded)
    assert np.abs(base - trained).max() > 1e-3  # the LoRA changes the output
    np.testing.assert_allclose(from_peft, trained, atol=1e-5)

    kohya = fresh_pipeline(home, preset)
    kohya.load_lora_weights(str(kohya_file))
    np.testing.assert_allclose(render(kohya), trained, atol=1e-5)

    keys = read_safetensors(kohya_file)
    alphas = {float(v) for k, v in keys.items() if k.endswith(".alpha")}
    assert alphas == {2.0} and result.rank == 4  # the real lora_alpha, not the rank
    te = "lora_te1_text_model_encoder_layers_" if family == "sdxl" else "lora_te_text_model_encoder_layers_"
    assert any(k.startswith(te) for k in keys)
    assert any(k.startswith("lora_unet_down_blocks_") and k.endswith(".lora_down.weight") for k in keys)


def test_kohya_names_for_both_sdxl_text_encoders():
    lora = {"unet": {"mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(2, 4)},
            "text_encoder": {"encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 4)},
            "text_encoder_2": {"encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 4)}}
    keys = set(kohya_state(lora, "sdxl", 1.5))
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys
    assert "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q.alpha" in keys
    assert float(kohya_state(lora, "sdxl", 1.5)["lora_te2_text_model_encoder_layers_0_self_attn_q_proj.alpha"]) == 1.5


# --- the flow and the CLI ----------------------------------------------------------------


# One thread per child: the CLI runs in subprocesses next to pytest on a small shared CPU.
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def cli(settings: Settings, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", "from portrait.cli.main import entry; entry()", "--home", str(settings.home),
           "--preset", "tiny", "--device", "cpu", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV)


def lora_tensors(path: Path) -> dict[str, torch.Tensor]:
    return read_safetensors(path)


@pytest.mark.slow
def test_kill_then_resume_equals_uninterrupted_and_cli_end_to_end(home, photos):
    from portrait.flows.train import train

    identity = train([photos], "alice", settings=home)  # uninterrupted, through the Python API
    root = identity.root
    for name in ("manifest.json", "lora.safetensors", "lora_kohya.safetensors", "reference.png", "report.json",
                 "embeddings.npz"):
        assert (root / name).is_file(), name
    assert identity.photos and all(p.is_file() for p in identity.photos)
    lora = identity.lora_for("sd15")
    assert lora and (lora.rank, lora.alpha, lora.base_model) == (4, 2.0, "sd15")
    manifest = identity.manifest
    # 6 photos kept, 1 held out for validation: 5 train, 2 steps each; step 0 is the base model
    assert manifest["train"]["steps"] == 10 and [row["step"] for row in manifest["validation"]] == [0, 4, 8, 10]
    assert manifest["train"]["validation"]["against"] == "held-out photos"
    assert all(row["score"] == 0.0 for row in manifest["validation"])  # tiny models draw no faces
    assert manifest["train"]["selection"] == "last"
    assert manifest["base_model"]["sha256"] and manifest["versions"]["diffusers"]
    assert json.loads((root / "report.json").read_text())["kept"] == 6
    assert "dlib" in identity.consensus
    assert not (home.identities_dir / ".alice.work").exists()

    # The same run through the CLI under another name, SIGKILLed after its first checkpoint.
    cmd = [sys.executable, "-c", "from portrait.cli.main import entry; entry()", "--home", str(home.home),
           "--preset", "tiny", "--device", "cpu", "train", str(photos), "--name", "bob"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    first = home.identities_dir / ".bob.work" / "checkpoints" / "step-000004"
    deadline = time.time() + 600
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first.exists() and not (home.identities_dir / "bob" / "manifest.json").exists(), "killed too late"

    resumed = cli(home, "train", str(photos), "--name", "bob", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at step" in resumed.stderr and "checkpoint 10" in resumed.stdout
    bob = load_identity(home, "bob")
    assert bob.manifest["train"]["resumed_from"] in (4, 8)
    a, b = lora_tensors(root / "lora.safetensors"), lora_tensors(bob.root / "lora.safetensors")
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    assert manifest["train"]["losses"] == bob.manifest["train"]["losses"]


def test_zero_shot_bundle_has_no_lora(home, photos):
    from portrait.flows.train import train

    identity = train([photos], "zed", settings=home, zero_shot=True)
    assert identity.loras == {} and identity.reference.is_file() and "dlib" in identity.consensus
    assert not (identity.root / "lora.safetensors").exists()


def test_validation_scorer_rates_the_person_high_and_a_faceless_image_none(home, photos, astronaut, hopper):
    from portrait.flows.train import face_scorer
    from portrait.flows.prepare import prepare

    ctx = RunContext.create(home, preset="tiny")
    prepared = prepare([photos], home.home / "prepared", ctx=ctx)
    score = face_scorer(ctx, prepared.face_backend, prepared.training_set.consensus)
    same, other = score(astronaut), score(hopper)
    assert same > 0.5 > other, (same, other)
    assert score(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)) is None


def one_line_exit_2(capsys, *args: str, needles: tuple[str, ...]) -> None:
    from portrait.cli.main import run

    capsys.readouterr()
    code = run(list(args))
    err = capsys.readouterr().err
    assert code == 2, (code, err)
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_bad_inputs_exit_2_with_one_line(home, tmp_path, photos, capsys):
    from skimage import data

    common = ["--home", str(home.home), "--preset", "tiny", "--device", "cpu", "train"]
    existing = home.identities_dir / "taken"
    existing.mkdir(parents=True)
    (existing / "manifest.json").write_text(json.dumps({"name": "taken"}))
    one_line_exit_2(capsys, *common, str(photos), "--name", "taken", needles=("taken", "already exists", "--overwrite"))

    faceless = tmp_path / "faceless"
    faceless.mkdir()
    Image.fromarray(data.coffee()).save(faceless / "coffee.jpg")
    Image.fromarray(data.chelsea()).save(faceless / "cat.png")
    (faceless / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    one_line_exit_2(capsys, *common, str(faceless), "--name", "nobody", needles=("0 usable photo",))

    blocker = tmp_path / "plain-file"
    blocker.write_text("a file where the home folder should be")
    one_line_exit_2(capsys, "--home", str(blocker / "home"), "--preset", "tiny", "train", str(photos), "--name", "x",
                    needles=("not writable",))
    one_line_exit_2(capsys, *common, str(photos), "--name", "bad/name", needles=("bad/name",))


def test_prior_preservation_uses_cached_class_images(home, tmp_path, astronaut, hopper):
    from portrait.stages.train import class_images

    policy = tiny_policy(steps=2, validation_seeds=[], prior_preservation=True, class_images=2, class_steps=2)
    models = TrainModels("sd15", fresh_pipeline(home))
    folder = tmp_path / "class-images"
    made = class_images(models, "a photo of a person", policy, folder, "cpu")
    assert len(made) == 2 and made[0].shape == (64, 64, 3)
    stamps = [p.stat().st_mtime_ns for p in sorted(folder.glob("*.png"))]
    again = class_images(models, "a photo of a person", policy, folder, "cpu")
    assert [p.stat().st_mtime_ns for p in sorted(folder.glob("*.png"))] == stamps  # read back, not redrawn
    assert all(np.array_equal(a, b) for a, b in zip(made, again))

    data = dataclasses.replace(crops(astronaut, hopper), class_images=made, class_prompt="a photo of a person")
    unweighted = train_lora(TrainModels("sd15", fresh_pipeline(home)), data,
                            dataclasses.replace(policy, prior_loss_weight=0.0), tmp_path / "unweighted")
    prior = train_lora(models, data, policy, tmp_path / "prior")
    # Same draws on step 1 (batch, noise, timesteps): the only difference is the class-image term.
    assert prior.losses[0] > unweighted.losses[0] + 1e-3


def test_loss_summary_compares_the_start_of_a_short_run_with_its_end():
    result = TrainResult(lora={}, rank=4, alpha=2, steps=4, losses=(4.0, 3.0, 2.0, 1.0), checkpoints=(),
                         selected=(4,), selection="last", timings={})
    summary = result_summary(result)
    assert (summary["first_loss"], summary["final_loss"]) == (3.5, 1.5)


# --- lazy caches, freed modules, knobs (issue 16) ----------------------------------------


def test_latents_encode_on_first_use_and_freed_modules_do_not_change_the_run(home, tmp_path, astronaut, hopper):
    data = crops(astronaut, hopper)
    policy = tiny_policy(steps=6, checkpoint_every=3, validation_seeds=[1], train_text_encoder=False)
    run = setup_training(TrainModels("sd15", fresh_pipeline(home)), data, policy, total=6)
    assert not run.instances.mean and not run.prompts.embeds  # nothing encoded up front
    run.plan(0)
    drawn = {("instance", i, m) for step in range(6) for i, m in run.draws(step, _gen(policy, step)).picks}
    assert run.pending_latents == drawn
    loss = step_loss(run, 0)
    assert set(run.instances.mean) == {(i, m) for i, m in run.draws(0, _gen(policy, 0)).picks}  # only step 0's
    assert torch.isfinite(loss)

    # The trainer with a reloader: the VAE and text encoder leave once the run's draws are
    # cached, come back for each validation render, and the LoRA is the same as without.
    reloads = []

    def reload(names):
        reloads.append(tuple(names))
        fresh = fresh_pipeline(home)
        return {name: getattr(fresh, name) for name in names}

    seen = []
    pipe = fresh_pipeline(home)
    freed = train_lora(TrainModels("sd15", pipe, reload=reload), data, policy, tmp_path / "freed",
                       scorer=lambda image: None, restore_pipeline=False,
                       on_event=lambda e: seen.append((e.phase, pipe.vae is None, pipe.text_encoder is None)))
    kept = train_lora(TrainModels("sd15", fresh_pipeline(home)), data, policy, tmp_path / "kept",
                      scorer=lambda image: None)
    assert freed.losses == kept.losses
    for name in freed.lora["unet"]:
        assert torch.equal(freed.lora["unet"][name], kept.lora["unet"][name])
    steps = [(vae, te) for phase, vae, te in seen if phase == "step"]
    assert steps[-1] == (True, True)  # freed by the end of training
    assert steps[0][1]  # the one prompt is cached at step 1: the text encoder goes at once
    assert any("text_encoder" in names for names in reloads)  # validation brought it back
    assert pipe.vae is None and pipe.text_encoder is None  # restore_pipeline=False leaves them freed


def _gen(policy, step):
    from portrait.stages.train import step_generator

    return step_generator(policy.seed, step)


def test_train_knobs_reach_the_policy_and_bad_values_exit_2(home, photos, capsys, astronaut, hopper, tmp_path):
    from portrait.flows.train import policy_overrides

    fields = policy_overrides(steps=5, rank=8, resolution=128, batch_size=2, lr=3e-4, alpha=4.0,
                              train_text_encoder=True, optimizer="adamw", gradient_checkpointing=True,
                              mixed_precision="no")
    policy = tiny_policy(**fields)
    assert (policy.steps, policy.rank, policy.resolution, policy.batch_size, policy.learning_rate, policy.alpha,
            policy.train_text_encoder, policy.gradient_checkpointing) == (5, 8, 128, 2, 3e-4, 4.0, True, True)
    prodigy = policy_overrides(optimizer="prodigy")
    assert prodigy["learning_rate"] == 1.0 == prodigy["text_encoder_lr"]

    # Prodigy trains (and checkpoints its state) like AdamW.
    result = train_lora(TrainModels("sd15", fresh_pipeline(home)), crops(astronaut, hopper),
                        tiny_policy(steps=2, optimizer="prodigy", learning_rate=1.0, validation_seeds=[]),
                        tmp_path / "prodigy")
    assert len(result.losses) == 2 and all(np.isfinite(result.losses))

    common = ["--home", str(home.home), "--preset", "tiny", "--device", "cpu", "train", str(photos), "--name", "k"]
    for option, needles in ((["--resolution", "100"], ("--resolution 100", "multiple of 8")),
                            (["--batch-size", "0"], ("--batch-size 0",)),
                            (["--lr", "0"], ("--lr 0",)),
                            (["--alpha", "-1"], ("--alpha -1",)),
                            (["--optimizer", "sgd"], ("--optimizer sgd", "adamw, adamw8bit, prodigy")),
                            (["--mixed-precision", "fp8"], ("--mixed-precision fp8",)),
                            (["--mixed-precision", "fp16"], ("--mixed-precision fp16", "CUDA"))):
        one_line_exit_2(capsys, *common, *option, needles=needles)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        one_line_exit_2(capsys, *common, "--optimizer", "adamw8bit", needles=("adamw8bit", "bitsandbytes"))


def test_batch_spec_carries_train_options_and_refuses_bad_ones():
    from portrait.studio.spec import parse_spec

    spec = parse_spec({"output": "out", "prompts": ["x"], "identities": [{"name": "bob", "photos": "p",
                                                         "train": {"rank": 8, "optimizer": "prodigy", "lr": 0.5}}]})
    assert spec.identities[0].train == {"rank": 8, "optimizer": "prodigy", "lr": 0.5}
    for bad, needle in (({"optimizer": "sgd"}, "--optimizer sgd"), ({"resolution": 100}, "--resolution 100"),
                        ({"bogus": 1}, "bogus")):
        with pytest.raises(BadInput, match=needle):
            parse_spec({"output": "out", "prompts": ["x"], "identities": [{"name": "bob", "photos": "p", "train": bad}]})
