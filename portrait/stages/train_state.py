"""Training state on disk: the work folder, checkpoints and the RNG states a resume restores.

Why it is resumable: every `checkpoint_every` steps the loop (stages/train.py) calls
`save_checkpoint`, which writes the LoRA (portrait.core.formats.lora), the optimizer, the LR
schedule and the RNG states into a temp folder beside the target, fsyncs every file and the
folder, and renames it into place (then fsyncs the parent). A kill -9 at any point leaves
either the whole checkpoint or none of it, and since all randomness of step k comes from a
generator seeded by (seed, k), the run resumed from its last checkpoint reproduces the
uninterrupted run bit for bit on CPU (tests/test_train.py kills a real run to check it).

`run.json` records what must match for a resume to continue the same run (`run_params`).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from portrait.core.errors import BadInput
from portrait.core.formats.lora import write_lora_file
from portrait.core.io import fsync_dir, sync_tree, write_json

from portrait.stages.train_types import Baseline, CheckpointRecord, TrainData, TrainPolicy

RUN_FILE = "run.json"
CHECKPOINTS = "checkpoints"


@dataclass(frozen=True)
class TrainEvent:
    """Progress, for bars and logs. phase: cache | class_images | step | validate | scores | stop | select."""

    phase: str
    step: int
    total: int
    loss: float | None = None
    message: str = ""


BASELINE_FILE = "baseline.json"


def save_baseline(workdir: Path, baseline: Baseline) -> None:
    write_json(Path(workdir) / BASELINE_FILE, {"scores": list(baseline.scores), "clip_t": list(baseline.clip_t)})


def read_baseline(workdir: Path) -> Baseline | None:
    path = Path(workdir) / BASELINE_FILE
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return Baseline(tuple(float(x) for x in data["scores"]), tuple(float(x) for x in data.get("clip_t", ())))


def rng_state() -> dict[str, Any]:
    import torch

    # Steps draw from step_generator; these global states are saved anyway so anything else
    # random (a dropout a preset switches on, a custom scheduler) also resumes exactly.
    _name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [keys.tolist(), int(pos), int(has_gauss), float(cached)],
             "python": repr(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    import ast

    import torch

    torch.set_rng_state(state["torch"])
    keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    random.setstate(ast.literal_eval(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dir(workdir: Path, step: int) -> Path:
    return workdir / CHECKPOINTS / f"step-{step:06d}"


def save_checkpoint(workdir: Path, step: int, state: Mapping[str, Mapping[str, Any]], optimizer, lr_scheduler,
                    losses: Sequence[float], scores: Sequence[float], clip_t: Sequence[float] = ()) -> Path:
    """Write LoRA + optimizer + schedule + RNG into a temp folder, fsync its files and the
    folder, then rename it into place and fsync the parent: after a power cut the checkpoint
    folder is complete or absent, never present with empty files."""
    import torch

    target = checkpoint_dir(workdir, step)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write_lora_file(tmp / "lora.safetensors", state)
        torch.save({"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(), "rng": rng_state(),
                    "step": step, "losses": list(losses)}, tmp / "state.pt")
        (tmp / "meta.json").write_text(json.dumps({"step": step, "scores": list(scores), "clip_t": list(clip_t),
                                                   "loss": float(np.mean(losses[-50:])) if losses else 0.0}))
        sync_tree(tmp)  # every file and the folder itself
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        fsync_dir(target.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return target


def read_checkpoint_meta(path: Path) -> CheckpointRecord:
    meta = json.loads((path / "meta.json").read_text())
    return CheckpointRecord(int(meta["step"]), path, float(meta["loss"]), tuple(float(s) for s in meta["scores"]),
                            tuple(float(c) for c in meta.get("clip_t", ())))


def completed_checkpoints(workdir: Path) -> list[CheckpointRecord]:
    root = workdir / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in sorted(root.glob("step-*")) if (p / "meta.json").is_file() and (p / "state.pt").is_file()]
    return [read_checkpoint_meta(p) for p in found]


def run_params(policy: TrainPolicy, data: TrainData, total: int, base_model: str) -> dict[str, Any]:
    """What must match for a resume to continue the same run."""
    params = asdict(policy)
    params.pop("keep_checkpoints", None)
    return {"policy": params, "total_steps": total, "data": data.fingerprint(), "base_model": base_model}


def prepare_workdir(workdir: Path, params: dict[str, Any], resume: bool) -> list[CheckpointRecord]:
    """Start fresh, or check that the interrupted run in `workdir` is this one and list its checkpoints."""
    run_file = workdir / RUN_FILE
    jsonable = json.loads(json.dumps(params, default=str))
    if resume and run_file.is_file():
        previous = json.loads(run_file.read_text())
        if previous != jsonable:
            changed = sorted(k for k in jsonable if previous.get(k) != jsonable.get(k))
            raise BadInput(f"{run_file}: --resume with different {', '.join(changed)} than the interrupted run; "
                           "rerun with the same options or drop --resume")
        return completed_checkpoints(workdir)
    if workdir.exists():
        shutil.rmtree(workdir / CHECKPOINTS, ignore_errors=True)
        (workdir / BASELINE_FILE).unlink(missing_ok=True)
    workdir.mkdir(parents=True, exist_ok=True)
    write_json(run_file, jsonable)
    return []


def discard_checkpoints(workdir: Path, keep: bool) -> None:
    if not keep:
        shutil.rmtree(Path(workdir) / CHECKPOINTS, ignore_errors=True)


__all__ = ["RUN_FILE", "CHECKPOINTS", "TrainEvent", "CheckpointRecord", "Baseline", "save_baseline", "read_baseline",
           "rng_state", "restore_rng", "checkpoint_dir",
           "save_checkpoint", "read_checkpoint_meta", "completed_checkpoints", "run_params", "prepare_workdir",
           "discard_checkpoints"]
