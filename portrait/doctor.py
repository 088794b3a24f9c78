"""What `portrait doctor` reports: package versions, devices, and the models present."""

from __future__ import annotations

import importlib.metadata
import platform
from typing import Any

from .core.config import Settings
from .core.registry import Registry, model_table

PACKAGES = (
    "portrait", "torch", "torchvision", "diffusers", "transformers", "accelerate", "peft", "safetensors",
    "huggingface_hub", "insightface", "onnxruntime", "opencv-python-headless", "controlnet-aux", "spandrel",
    "scikit-image", "dlib-bin", "face-recognition-models", "open_clip_torch",
)


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def environment_report() -> dict[str, Any]:
    import torch

    report: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform()}
    report.update(package_versions())
    report["cuda"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        report["gpu"] = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        free, total = torch.cuda.mem_get_info()
        report["vram"] = f"{free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB"
    else:
        report["gpu"] = "none (CPU only: real models run, slowly; the tiny preset is instant)"
    return report


def model_rows(settings: Settings) -> list[dict[str, Any]]:
    return model_table(Registry.load(), settings)
