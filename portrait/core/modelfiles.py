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


def onnx_providers(ctx) -> list[str]:
    """onnxruntime execution providers for a RunContext (or a Placement, or a device string):
    CUDA first only when the device is CUDA *and* this onnxruntime build has the CUDA
    provider (the CPU wheel does not: asking for it anyway only logs a warning per session)."""
    import onnxruntime

    if _device(ctx).startswith("cuda") and CUDA_PROVIDER in onnxruntime.get_available_providers():
        return [CUDA_PROVIDER, CPU_PROVIDER]
    return [CPU_PROVIDER]


def onnx_ctx_id(ctx) -> int:
    """insightface's `prepare(ctx_id=...)`: 0 on the GPU, -1 (CPU only) otherwise."""
    return 0 if CUDA_PROVIDER in onnx_providers(ctx) else -1


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

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = insightface.model_zoo.get_model(str(path), providers=onnx_providers(ctx))
    found = type(model).__name__ if model is not None else "nothing"
    if model is None or (expect and found != expect):
        raise bad_file(path, f"is not an insightface {expect or 'model'} (insightface routed it to {found})")
    if hasattr(model, "prepare"):  # INSwapper has none: its session already has the providers
        model.prepare(ctx_id=onnx_ctx_id(ctx))
    return model


