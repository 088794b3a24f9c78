"""What `portrait doctor` reports: package versions, devices, and the models present."""

from __future__ import annotations

import importlib.metadata
import platform
from typing import Any

from .core.config import Settings
from .core.registry import Registry, model_table

PACKAGES = (
    "portrait", "torch", "torchvision", "diffusers", "transformers", "accelerate", "peft", "safetensors",
    "huggingface_hub", "insightface", "onnxruntime", "onnxruntime-gpu", "optimum-quanto", "opencv-python-headless", "controlnet-aux", "spandrel",
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
    report["face analysis (onnxruntime)"] = onnxruntime_report(torch.cuda.is_available())
    return report


def onnxruntime_report(cuda: bool) -> str:
    """One line: which onnxruntime wheel is installed and whether its CUDA provider really starts.

    `onnxruntime` (CPU) and `onnxruntime-gpu` install the same module and overwrite each other's
    files; `get_available_providers()` lists CUDA even when cuDNN fails to load, so on a CUDA
    machine a real session is made and its providers read (docs/ARCHITECTURE.md#onnxruntime)."""
    versions = package_versions()
    cpu, gpu = versions.get("onnxruntime"), versions.get("onnxruntime-gpu")
    both = cpu != "not installed" and gpu != "not installed"
    wheel = "onnxruntime-gpu " + gpu if gpu != "not installed" else "onnxruntime " + str(cpu)
    if both:
        return (f"BROKEN: onnxruntime {cpu} and onnxruntime-gpu {gpu} are both installed and overwrite each "
                f"other: pip uninstall -y onnxruntime onnxruntime-gpu && pip install 'portrait[gpu]' (make install-gpu)")
    try:
        import onnxruntime
    except ImportError:
        return "not installed: pip install portrait (CPU) or 'portrait[gpu]'"
    available = onnxruntime.get_available_providers()
    if not cuda:
        return f"{wheel}: CPU (no CUDA device)"
    if "CUDAExecutionProvider" not in available:
        return f"{wheel}: CPU only on a CUDA machine (the CPU wheel): pip uninstall -y onnxruntime && pip install 'portrait[gpu]'"
    got = cuda_session_providers()
    if "CUDAExecutionProvider" in got:
        return f"{wheel}: CUDA (a test session ran on CUDAExecutionProvider)"
    return (f"{wheel}: CUDA is listed but a session fell back to {', '.join(got) or 'nothing'} (cuDNN or the CUDA "
            f"runtime failed to load: install the CUDA 12 / cuDNN 9 libraries onnxruntime-gpu needs)")


def cuda_session_providers() -> list[str]:
    """The providers a one-node session really gets when CUDA is asked for."""
    import onnxruntime
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "doctor",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    try:
        session = onnxruntime.InferenceSession(model.SerializeToString(),
                                               providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    except Exception as exc:  # a broken install: report, do not crash doctor
        return [f"error {exc.__class__.__name__}"]
    return list(session.get_providers())


def model_rows(settings: Settings) -> list[dict[str, Any]]:
    return model_table(Registry.load(), settings)


# Files above this are not hashed by `doctor` (a 4 GB base takes ~15 s); `models verify` does.
DOCTOR_HASH_LIMIT = 512 * 2**20


def bill_of_materials(settings: Settings) -> dict[str, Any]:
    """The models the preset would load under the license policy in force: per role, the model,
    its license class and source, where it resolves from and each file's sha256 (or why not)."""
    from .core.context import RunContext
    from .core.errors import BadInput, ModelMissing
    from .core.faces import pick_backend
    from .core.io import sha256_file
    from .core.licenses import BUILTIN, LicenseRefused, bom_row

    try:
        ctx = RunContext.create(settings)
    except BadInput as exc:  # doctor reports; an unknown preset is one of the things it reports
        return {"license_policy": settings.license, "preset": settings.preset, "face_backend": None, "models": [],
                "error": str(exc)}

    def hasher(path):
        if path.stat().st_size > DOCTOR_HASH_LIMIT:
            return f"not hashed ({path.stat().st_size / 2**30:.1f} GiB; `portrait models verify`)"
        return sha256_file(path)

    face = pick_backend("auto", ctx.registry, ctx.settings)
    roles = dict(ctx.preset.models)
    if face == "auraface":
        roles.update({"face_recognizer": "auraface", "face_landmarks": "dlib-landmarks-5"})
    elif face == "dlib":
        roles.update({"face_recognizer": "dlib-face-recognition", "face_landmarks": "dlib-landmarks-5"})
    rows = []
    for role, model_id in sorted(roles.items()):
        try:
            spec = ctx.registry.get(model_id)
            # dlib's models ship in a package and have no stand-in: they load as they are
            tiny = ctx.preset.tiny and spec.source != "package"
            row = bom_row(ctx.registry, ctx.registry.resolve(model_id, ctx.settings, tiny=tiny), hasher)
            row["status"] = "present"
        except LicenseRefused as exc:
            row = {"id": model_id, "status": "refused", "reason": str(exc)}
        except (ModelMissing, BadInput) as exc:
            row = {"id": model_id, "status": "missing", "reason": str(exc)}
        if row["status"] != "present":
            spec = ctx.registry.specs.get(model_id)
            if spec is not None:
                row.update(license=spec.license, license_class=spec.license_class, license_source=spec.license_source)
        rows.append({"role": role, **row})
    if face in ("dlib", "auraface"):
        rows.append({"role": "face_detector", "status": "present", **BUILTIN["dlib-hog-detector"]})
    return {"license_policy": ctx.settings.license, "preset": ctx.preset.name, "face_backend": face, "models": rows}


def backend_paths(settings: Settings) -> list[dict[str, Any]]:
    """Each identity backend on the shipped presets that run it, under the license policy in
    force: `available` (every model it loads is allowed and present), `allowed` (allowed, some
    not downloaded yet: the command that fetches them), or `refused` (the one line a generate
    call would print, naming what to use instead). Tiny presets answer for their stand-ins."""
    from .core.config import available_presets, load_preset
    from .core.errors import BadInput, ModelMissing
    from .core.licenses import LicenseRefused, backend_refused, check
    from .stages.backends import BACKENDS

    registry = Registry.load()
    presets = [load_preset(name) for name in available_presets()]
    rows = []
    for spec in BACKENDS.specs():
        models = spec.models(spec.read({})) if callable(spec.models) else spec.models
        for preset in presets:
            if preset.family not in spec.families or preset.license:
                continue
            default = str(preset.section("generate").get("backend", "lora"))
            if default != spec.name and not (preset.name in ("sd15", "sdxl", "flux", "tiny", "tiny-sdxl", "tiny-flux")):
                continue  # a frontier preset lists its own backend; the SD/FLUX presets list every backend of their family
            # every backend loads the preset's base (lora and template name no other role)
            ids = list(dict.fromkeys(preset.models[role] for role in ("base", *models) if role in preset.models))
            row = {"backend": spec.name, "preset": preset.name, "tiny": preset.tiny, "models": ids}
            try:
                for model_id in ids:
                    check(registry, model_id, settings.license)
            except LicenseRefused as exc:
                rows.append({**row, "status": "refused", "detail": str(backend_refused(registry, exc, spec.name))})
                continue
            missing = []
            for model_id in ids:
                try:
                    registry.stand_in(model_id, preset.tiny)
                    if not preset.tiny and not registry.is_present(model_id, settings):
                        missing.append(model_id)
                except (BadInput, ModelMissing):
                    missing.append(model_id)
            if missing:
                rows.append({**row, "status": "allowed", "detail": "not downloaded: " + "; ".join(
                    f"portrait models download {m}" for m in missing)})
            else:
                rows.append({**row, "status": "available",
                             "detail": "make-tiny stand-ins (written on first use)" if preset.tiny else "present"})
    return rows
