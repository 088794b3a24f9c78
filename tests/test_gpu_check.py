"""`python scripts/gpu_check.py --dry-run`: the GPU check's code paths on the CPU (tiny sizes),
as CI runs it. On a CUDA machine the same script runs every backend at real precision."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_gpu_check_dry_run_passes_on_the_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    assert _script().main(["--dry-run", "--out", str(out), "--home", str(tmp_path / "home")]) == 0
    document = json.loads(out.read_text())
    assert document["failed"] == [] and document["environment"]["dry_run"] is True
    steps = {s["name"]: s for s in document["steps"]}
    assert steps["train fp16 GradScaler logic"]["details"]["scale_after_overflow"] < \
        steps["train fp16 GradScaler logic"]["details"]["scale_start"]
    # the offload strategies really ran (their hooks, on the CPU) and int8 was applied
    assert steps["backend flux model"]["details"]["strategy"] == "model_offload"
    assert steps["backend flux group"]["details"]["strategy"] == "group_offload"
    assert steps["backend flux int8"]["details"]["quantize"]["transformer"] == "int8"
    assert steps["real-size sd15 random weights"]["details"]["plan_error"] <= 0.10
    assert steps["face analysis (onnxruntime)"]["details"]["providers"] == ["CPUExecutionProvider"]
    flow = steps["train flow-matching step bf16 (tiny klein base)"]["details"]  # the flow-matching loop (issue 28)
    assert flow["moved"] == flow["lora_tensors"] > 0 and len(flow["losses"]) == 2


def test_gpu_check_without_cuda_and_without_dry_run_exits_2(tmp_path, capsys):
    assert _script().main(["--out", str(tmp_path / "x.json")]) == 2
    assert "--dry-run" in capsys.readouterr().err


def test_a_black_image_fails_the_check():
    import numpy as np
    import pytest

    check_image = _script().check_image
    with pytest.raises(AssertionError, match="black"):
        check_image(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(AssertionError, match="NaN"):
        check_image(np.full((8, 8, 3), np.nan, np.float32))
    assert check_image(np.random.default_rng(0).integers(0, 255, (8, 8, 3)))["std"] > 0
