"""What a model builder is handed and the checks it shares: the half of the model door below the
architectures (portrait/core/archs/).

`portrait.core.models.load` resolves a registry id, then calls the `Kind` registered for the
kind it was asked for (portrait/core/archs/__init__.py lists them) with a `Source`: the run,
the resolved model, the file to read. A builder reads through `Source.weights()` /
`verified()` (sha256 against the registry, pickles weights-only), places what it built with
`Source.place` and loads a model it is made from with `Source.load` (the door, handed in, so
no architecture imports the door and the door imports only the table).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple

from .cache import CacheKey
from .errors import BadInput, ModelMissing, PortraitError, bad_file
from .modelspec import ResolvedModel

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"


@dataclass(frozen=True)
class Source:
    """What a builder is handed: the run, the resolved model and the file it should read."""

    ctx: Any
    resolved: ResolvedModel
    file: str | None = None  # a file (or folder) inside the model, None for its main path
    explicit: Path | None = None  # the user's own file, when one was given
    door: Callable[..., Any] | None = None  # portrait.core.models.load, for a model built from others

    def load(self, model_id: str, kind: str, **args: Any):
        """Another model through the door (a base's VAE role, a checkpoint a builder reads)."""
        if self.door is None:
            raise PortraitError(f"kind needs the model door to load '{model_id}' ({kind})")
        return self.door(self.ctx, model_id, kind, **args)

    @property
    def model_id(self) -> str:
        return self.resolved.spec.id

    @property
    def path(self) -> Path:
        """The file or folder to read (not yet hash-checked; see `verified`)."""
        return self.resolved.file(self.file) if self.file else self.resolved.path

    @property
    def folder(self) -> Path:
        """The model's folder (or the folder `file` names inside it), for `from_pretrained`."""
        return self.resolved.file(self.file) if self.file else self.resolved.root

    def verified(self) -> Path:
        return verify(self.ctx, self.resolved, self.file)

    def weights(self) -> dict:
        return read_weights(self.ctx, self.resolved, self.file)

    @property
    def dtype(self):
        """The torch dtype to load in: the placement's (fp32 on CPU, fp16/bf16 on CUDA)."""
        return self.ctx.placement.dtype

    @property
    def device(self) -> str:
        return self.ctx.placement.device

    def place(self, module, *, cast: bool = True, offloaded: bool = False):
        return place(self.ctx, module, cast=cast, offloaded=offloaded)


@dataclass(frozen=True)
class Kind:
    """One kind of model: how to build it from a `Source` and, where files can be told apart by
    their keys, how to recognise one. Declared in its architecture module and listed in
    portrait/core/archs/__init__.py (spandrel's architecture registry is the model)."""

    name: str
    build: Callable[..., Any]  # build(source, **args) -> object
    place: bool = False  # the door moves (and on CUDA casts) the result; False: the builder does it
    offloaded: bool = False  # a pipeline part: left where it is when the placement offloads
    detect: Callable[[Iterable[str]], bool] | None = None  # state-dict keys -> is this architecture

    @property
    def help(self) -> str:
        first = (self.build.__doc__ or "").strip().split("\n\n")[0]  # the docstring's first paragraph
        return " ".join(first.split())


def verify(ctx, resolved: ResolvedModel, name: str | None = None) -> Path:
    """A model file whose sha256 matches the registry (when the registry knows it), cached per
    (file, size, mtime). A mismatch is the user's file: one line, exit 2."""
    from .io import sha256_file

    path = resolved.file(name) if name else resolved.path
    if not path.exists():
        raise ModelMissing(resolved.spec.id, detail=f"{path.name} is absent")
    if not path.is_file():
        return path  # a folder: its files were checked against the record by ctx.resolve
    expected = resolved.spec.sha256.get(name or path.name)
    if expected and resolved.origin != "tiny":
        stat = path.stat()
        digest = ctx.cache.get(CacheKey(f"sha256:{path}", "", "", (stat.st_size, stat.st_mtime_ns)),
                               lambda: sha256_file(path))
        if digest != expected:
            raise bad_file(path, f"sha256 {digest[:12]} does not match the registry ({expected[:12]}); re-download it")
    return path


def read_weights(ctx, resolved: ResolvedModel, name: str | None = None) -> dict:
    """A checkpoint's tensors: hash-checked, then safetensors, or `torch.load(weights_only=True)`
    for a pickle (.bin/.pth/.ckpt/.pt), so no pickled code ever runs."""
    path = verify(ctx, resolved, name)
    return read_weights_file(path)


def read_weights_file(path: Path) -> dict:
    """The tensors of one weights file (no registry check: `read_weights` does that first)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own SafetensorError for a damaged file
            raise bad_file(path, f"cannot be read as safetensors ({exc.__class__.__name__})") from exc
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt or non-tensor pickle is the user's file, not our bug
        raise bad_file(path, f"cannot be read as a weights-only torch checkpoint ({exc.__class__.__name__})") from exc


def mapped_pickle(path: Path):
    """A weights-only torch pickle memory-mapped: its tensors' shapes and dtypes without reading
    their bytes (the memory plan counts parameters this way; nothing is built from it)."""
    import torch

    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def place(ctx, module, *, cast: bool = True, offloaded: bool = False):
    """Move a module (anything with `.to`) to ctx's device; on CUDA also to ctx's dtype.

    On CPU this is fp32 and a no-op for freshly loaded weights. `offloaded` modules are
    pipeline parts: under `placement.offload` they stay put for `enable_model_cpu_offload`.
    """
    placement = ctx.placement
    if not hasattr(module, "to") or (offloaded and placement.offload):
        return module
    moved = module.to(placement.device)
    module = module if moved is None else moved  # spandrel's descriptor.to returns None
    if cast and placement.is_cuda:
        moved = module.to(placement.dtype)
        module = module if moved is None else moved
    return module


def friendly(factory: Callable[[], Any], model_id: str) -> Callable[[], Any]:
    """Turn a library's failure on a model file into one line (exit 2), not a traceback."""

    def run():
        try:
            return factory()
        except PortraitError:
            raise
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            text = str(exc).strip()
            first = text.splitlines()[0] if text else exc.__class__.__name__
            raise BadInput(f"model '{model_id}': cannot load ({exc.__class__.__name__}: {first[:300]})") from exc

    return run


def _device(ctx) -> str:
    if isinstance(ctx, str):
        return ctx
    placement = getattr(ctx, "placement", ctx)
    return str(getattr(placement, "device", "cpu"))


def cuda_index(device: str) -> int:
    """N of `cuda:N` (0 for plain `cuda`)."""
    _, _, index = device.partition(":")
    return int(index) if index.isdigit() else 0


def onnx_providers(ctx) -> list:
    """onnxruntime execution providers for a RunContext (or a Placement, or a device string):
    CUDA first, on the device index of `cuda:N`, when the device is CUDA *and* this onnxruntime
    build has the CUDA provider; else the CPU, said once in one line when CUDA was asked for
    (the CPU wheel has no CUDA provider: `pip install 'portrait[gpu]'`, docs/ARCHITECTURE.md#onnxruntime)."""
    import onnxruntime

    device = _device(ctx)
    if device.startswith("cuda"):
        if CUDA_PROVIDER in onnxruntime.get_available_providers():
            return [(CUDA_PROVIDER, {"device_id": cuda_index(device)}), CPU_PROVIDER]
        onnx_fallback(f"this onnxruntime build ({_ort_distribution()}) has no CUDA provider; install the GPU "
                      f"build alone: pip uninstall -y onnxruntime && pip install 'portrait[gpu]' (or make install-gpu)")
    return [CPU_PROVIDER]


def onnx_ctx_id(ctx) -> int:
    """insightface's `prepare(ctx_id=...)`: the CUDA device index on the GPU, -1 (CPU only) otherwise."""
    providers = onnx_providers(ctx)
    return cuda_index(_device(ctx)) if any(_provider_name(p) == CUDA_PROVIDER for p in providers) else -1


def _provider_name(provider) -> str:
    return provider[0] if isinstance(provider, tuple) else str(provider)


def _ort_distribution() -> str:
    import importlib.metadata

    found = []
    for name in ("onnxruntime", "onnxruntime-gpu"):
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return " + ".join(found) or "onnxruntime"


# What happened to the CUDA provider in this process (for `portrait doctor` and results): each
# reason once, printed once on stderr.
ONNX_FALLBACKS: list[str] = []


def onnx_fallback(reason: str) -> None:
    """Face analysis asked for CUDA and runs on the CPU: one line, once per reason."""
    import sys

    if reason not in ONNX_FALLBACKS:
        ONNX_FALLBACKS.append(reason)
        print(f"warning: face analysis runs on the CPU, not the GPU: {reason}", file=sys.stderr)


def check_session(session, providers: list, what: str = "") -> None:
    """After a session exists: when CUDA was asked for and onnxruntime did not take it (it lists
    CUDA as available even when cuDNN or the CUDA runtime fails to load, and then falls back to
    the CPU silently), say so in one line."""
    asked = any(_provider_name(p) == CUDA_PROVIDER for p in providers)
    if asked and CUDA_PROVIDER not in (session.get_providers() or []):
        onnx_fallback(f"onnxruntime could not start its CUDA provider{f' for {what}' if what else ''} (cuDNN or the "
                      f"CUDA runtime failed to load; see `portrait doctor`)")


def check_insightface(model, providers: list, what: str = "") -> None:
    session = getattr(model, "session", None)
    if session is not None and hasattr(session, "get_providers"):
        check_session(session, providers, what)


def onnx_session(path: Path, ctx, what: str = "ONNX model"):
    """An onnxruntime.InferenceSession on `onnx_providers(ctx)`, its providers checked; a file
    onnxruntime cannot load is the user's file (one line, exit 2)."""
    import onnxruntime

    providers = onnx_providers(ctx)
    try:
        session = onnxruntime.InferenceSession(str(path), providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types for a bad file
        raise bad_file(path, f"is not a loadable {what} ({exc.__class__.__name__})") from None
    check_session(session, providers, Path(path).name)
    return session


@dataclass(frozen=True)
class Weights:
    """A checkpoint read into memory (adapter files): its id, file and state dict."""

    model_id: str
    path: Path
    state: dict


class ClipVision(NamedTuple):
    """A CLIP vision encoder and the processor for its input size (unpacks as a pair)."""

    model: Any
    processor: Any


def weights_name(source: Source, suffixes: tuple[str, ...]) -> str | None:
    """The file to read: the one asked for, the user's own file, else the first that fits."""
    if source.file:
        return source.file
    if source.explicit is not None and source.explicit.is_file():
        return source.explicit.name
    files = [f for f in source.resolved.files if not f.endswith("/")]
    return next((f for f in files if f.endswith(suffixes)), files[0] if files else None)


def nested(state: dict, heads: tuple[str, ...]) -> dict:
    """`{"a.x": t}` -> `{"a": {"x": t}}` for the given heads: the flat .safetensors form of a
    two-part checkpoint (diffusers' `load_ip_adapter` and PhotoMaker's loader accept both)."""
    if any(h in state for h in heads) or not any(k.split(".", 1)[0] in heads for k in state):
        return state
    out: dict[str, dict] = {h: {} for h in heads}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head in out:
            out[head][rest] = value
    return out


def insightface_model(path: Path | str, ctx, expect: str | None = None):
    """An ONNX file routed by insightface's model zoo to its class by its shapes (ArcFaceONNX,
    INSwapper, SCRFD, ...), on `onnx_providers(ctx)` and prepared; `expect` names the class
    it must route to. Analyzers that compose several files (portrait.core.faces) call this
    directly; a single model goes through `load(ctx, id, "insightface")`."""
    import warnings

    import insightface

    providers = onnx_providers(ctx)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = insightface.model_zoo.get_model(str(path), providers=providers)
    found = type(model).__name__ if model is not None else "nothing"
    if model is None or (expect and found != expect):
        raise bad_file(path, f"is not an insightface {expect or 'model'} (insightface routed it to {found})")
    if hasattr(model, "prepare"):  # INSwapper has none: its session already has the providers
        model.prepare(ctx_id=onnx_ctx_id(ctx))
    check_insightface(model, providers, Path(path).name)
    return model


