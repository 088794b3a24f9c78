"""The one model door: every model portrait loads comes through `load(ctx, model_id, kind)`.

Before this module each loader (face parser, CLIP, upscalers, the swapper, recognizers,
annotators, adapters, ...) repeated the same four steps its own way, and the ONNX provider
choice was written three ways (one never checked that CUDA was available). Here they are
written once, in this order:

1. resolve: the registry id (or an explicit file the user gave, described by that id's
   spec) through `ctx.resolve`, which applies the license policy, the tiny switch and the
   recorded-sha256 check (portrait.core.integrity; a changed stand-in or download is exit 3
   naming the command that rebuilds it), and records the id in the run's bill of materials;
2. verify: the file the builder reads is checked against the registry's sha256 (a user's
   file that does not match is refused in one line, exit 2);
3. build: the builder registered for `kind` with `@builder("kind")` turns the files into an
   object (the way insightface's model router turns an ONNX file into the right class);
4. place and cache: modules go to ctx's device, cast to its dtype on CUDA (fp16/bf16;
   fp32 on CPU), left on the CPU for pipeline parts when the preset asks for offload, and
   the result is kept in ctx.cache under one key scheme:
   `CacheKey(resolved id, device, dtype, (kind, file, explicit file stamp, args))`.

A loading failure on a user's file (OSError, ValueError, KeyError, RuntimeError from the
library) becomes one line naming the model, exit 2; a missing model is exit 3 naming
`portrait models download ID`.

Kinds registered here need only libraries and the foundation; a stage whose model wraps
into its own object registers its kind beside that object (`@builder("clip-score")` in
stages/score.py), so the stage module is imported before its kind is loaded. `kinds()`
lists what is registered. The heavy library imports stay inside the builders.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple

from .cache import CacheKey
from .errors import BadInput, ModelMissing, PortraitError, bad_file
from .registry import ResolvedModel

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"


# --- the builder table ---------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """What a builder is handed: the run, the resolved model and the file it should read."""

    ctx: Any
    resolved: ResolvedModel
    file: str | None = None  # a file (or folder) inside the model, None for its main path
    explicit: Path | None = None  # the user's own file, when one was given

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
class Builder:
    kind: str
    build: Callable[..., Any]  # build(source, **args) -> object
    place: bool  # the door moves (and on CUDA casts) the result; False: the builder does it
    offloaded: bool  # a pipeline part: left where it is when the placement offloads
    help: str


_BUILDERS: dict[str, Builder] = {}
_lock = threading.Lock()


def builder(kind: str, *, place: bool = False, offloaded: bool = False):
    """Register `fn(source, **args)` as the way to build models of `kind`.

    `place=True`: the door moves the returned module to ctx's device and, on CUDA, to its
    dtype (a builder that needs finer control, e.g. a model without fp16 support, places
    itself with `source.place(...)`). `offloaded=True`: the module becomes part of a diffusers
    pipeline, so under offload it stays on the CPU for `enable_model_cpu_offload`.
    Registering a kind twice replaces it (a reloaded module re-registers itself).
    """

    def register(fn):
        first = (fn.__doc__ or "").strip().split("\n\n")[0]  # the docstring's first paragraph
        with _lock:
            _BUILDERS[kind] = Builder(kind, fn, place, offloaded, " ".join(first.split()))
        return fn

    return register


def kinds() -> dict[str, str]:
    """Registered kinds and their one-line help."""
    return {k: b.help for k, b in sorted(_BUILDERS.items())}


# --- resolve, verify, place, cache --------------------------------------------------------------


def resolve(ctx, model_id: str, path: Path | str | None = None) -> ResolvedModel:
    """A registry id (honouring the tiny switch, license policy and recorded hashes), or the
    user's own file or folder `path`, described by `model_id`'s registry entry."""
    if path is None:
        return ctx.resolve(model_id)
    # a missing path is the registry's one line: "<path>: no such file or folder (given for model 'ID')"
    return ctx.registry.resolve(model_id, ctx.settings, tiny=ctx.preset.tiny, explicit=Path(path).expanduser())


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


def cache_key(ctx, model_id: str, kind: str, *variant: Any) -> CacheKey:
    """The one key scheme: (resolved id, device, dtype, (kind, *variant))."""
    return CacheKey(model_id, ctx.placement.device, ctx.placement.dtype_name, (kind, *variant))


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


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple, set, frozenset)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, Path):
        return str(value)
    try:
        hash(value)
    except TypeError:
        return repr(value)
    return value


def _stamp(explicit: Path | None) -> tuple | None:
    """The user's own file by path, size and mtime: a long-lived cache (the service, a batch
    runner) must not hand back the old model after the file at that path was replaced."""
    if explicit is None:
        return None
    stat = explicit.stat()
    return (str(explicit), stat.st_size, stat.st_mtime_ns)


def load(ctx, model_id: str, kind: str, *, path: Path | str | None = None, file: str | None = None, **args: Any):
    """Resolve, verify, build, place and cache one model; the same object on every later call.

    `path`: the user's own file or folder, described by `model_id`'s registry entry (its
    family, config); `file`: one file or folder inside the model (e.g. `models/image_encoder`);
    `args`: the builder's own options (part of the cache key).
    """
    entry = _BUILDERS.get(kind)
    if entry is None:
        raise PortraitError(f"no model builder is registered for kind '{kind}' (known: {', '.join(sorted(_BUILDERS))})")
    resolved = resolve(ctx, model_id, path)  # every call: the run's bill of materials records it
    explicit = Path(path).expanduser() if path is not None else None
    source = Source(ctx, resolved, file, explicit)
    key = cache_key(ctx, resolved.spec.id, kind, file, _stamp(explicit), _freeze(args))
    if entry.offloaded or kind == "components":  # placed per the plan's strategy: one copy per strategy
        key = CacheKey(key.model_id, key.device, key.dtype, (*key.variant, getattr(ctx.placement, "strategy", "resident")))

    def factory():
        built = entry.build(source, **args)
        return place(ctx, built, offloaded=entry.offloaded) if entry.place else built

    return ctx.cache.get(key, friendly(factory, model_id))



# --- ONNX ---------------------------------------------------------------------------------------


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


# --- kinds the foundation builds --------------------------------------------------------------


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


def _weights_name(source: Source, suffixes: tuple[str, ...]) -> str | None:
    """The file to read: the one asked for, the user's own file, else the first that fits."""
    if source.file:
        return source.file
    if source.explicit is not None and source.explicit.is_file():
        return source.explicit.name
    files = [f for f in source.resolved.files if not f.endswith("/")]
    return next((f for f in files if f.endswith(suffixes)), files[0] if files else None)


@builder("weights")
def _weights(source: Source) -> dict:
    """A state dict from .safetensors or a weights-only pickle, hash-checked; kept on the CPU."""
    return read_weights(source.ctx, source.resolved, _weights_name(source, (".safetensors", *PICKLE_SUFFIXES)))


def _nested(state: dict, heads: tuple[str, ...]) -> dict:
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


@builder("ip-adapter")
def _ip_adapter(source: Source) -> Weights:
    """An IP-Adapter-style checkpoint {image_proj, ip_adapter} (FaceID, FaceID-Plus(V2),
    InstantID's ip-adapter.bin), .bin or .safetensors; kept on the CPU for `load_ip_adapter`."""
    name = _weights_name(source, (".bin", ".safetensors"))
    state = _nested(read_weights(source.ctx, source.resolved, name), ("image_proj", "ip_adapter"))
    path = source.resolved.file(name) if name else source.resolved.path
    if not isinstance(state, dict) or not {"image_proj", "ip_adapter"} <= set(state):
        raise bad_file(path, "not an IP-Adapter checkpoint (needs image_proj and ip_adapter)")
    return Weights(source.model_id, path, state)


PHOTOMAKER_KEYS = ["id_encoder", "lora_weights"]


@builder("photomaker-checkpoint")
def _photomaker_checkpoint(source: Source) -> Weights:
    """A PhotoMaker v1/v2 checkpoint {id_encoder, lora_weights} (.bin, or flat .safetensors);
    the backend builds its ID encoder from `state["id_encoder"]`."""
    name = _weights_name(source, (".bin", ".safetensors"))
    state = _nested(read_weights(source.ctx, source.resolved, name), tuple(PHOTOMAKER_KEYS))
    path = source.resolved.file(name) if name else source.resolved.path
    if not isinstance(state, dict) or list(state) != PHOTOMAKER_KEYS:
        raise bad_file(path, "not a PhotoMaker checkpoint (its keys must be exactly id_encoder, lora_weights)")
    return Weights(source.model_id, path, state)


@builder("clip-vision")
def _clip_vision(source: Source) -> ClipVision:
    """CLIPVisionModelWithProjection (IP-Adapter's ViT-H image encoder; `file="models/image_encoder"`)
    and a CLIPImageProcessor for its input size."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    model = CLIPVisionModelWithProjection.from_pretrained(source.folder, dtype=source.dtype)
    model = source.place(model).eval()
    size = int(model.config.image_size)
    return ClipVision(model, CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}))


@builder("vae", place=True, offloaded=True)
def _vae(source: Source):
    """diffusers AutoencoderKL: a folder (config.json + weights) or a single file with its config."""
    from .loaders import build_vae

    return build_vae(source)


@builder("controlnet", place=True, offloaded=True)
def _controlnet(source: Source):
    """diffusers ControlNetModel: a folder (fp16 variant, subfolder like InstantID's IdentityNet
    ControlNetModel/) or a single ControlNet-v1-1 file with its config."""
    from .loaders import build_controlnet

    return build_controlnet(source).eval()


@builder("components")
def _components(source: Source, family: str, vae: str | None = None, requested: str | None = None,
                quantize: str = "none", dtypes: Mapping[str, str] | None = None):
    """A Stable Diffusion / FLUX base's modules (unet or transformer, vae, text encoders,
    tokenizers, scheduler); the pipelines loaders.load_pipeline composes around them live with them."""
    from .loaders import build_components

    return build_components(source, family, vae, requested, quantize, dtypes)


@builder("pulid")
def _pulid(source: Source):
    """PuLID (SDXL) checkpoint: (IDFormer placed on the device, {processor index: id_to_k/id_to_v weights})."""
    from .archs import pulid as arch

    state = source.weights()
    if not arch.detect(state):
        raise bad_file(source.path, "is not a PuLID SDXL checkpoint (no id_adapter / id_adapter_attn_layers keys)")
    encoder, layers = arch.split_state(state)
    try:
        model = arch.build_idformer(encoder)
    except (ValueError, RuntimeError) as exc:
        raise bad_file(source.path, f"cannot be loaded as PuLID's IDFormer ({str(exc).splitlines()[0]})") from None
    return source.place(model), layers


@builder("pulid-flux")
def _pulid_flux(source: Source):
    """PuLID-FLUX checkpoint: (IDFormer, ModuleList of the ID cross-attentions), both placed on the device."""
    from .archs import pulid as arch

    state = source.weights()
    if not arch.detect_flux(state):
        raise bad_file(source.path, "is not a PuLID-FLUX checkpoint (no pulid_encoder / pulid_ca keys)")
    try:
        encoder, blocks = arch.split_flux_state(state)
        model, ca = arch.build_idformer(encoder), arch.build_flux_ca(blocks)
    except (ValueError, RuntimeError) as exc:
        raise bad_file(source.path, f"cannot be loaded as PuLID-FLUX ({str(exc).splitlines()[0]})") from None
    return source.place(model), source.place(ca)


@builder("eva-clip", place=True)
def _eva_clip(source: Source):
    """EVA-CLIP visual tower (EVA02-CLIP-L-14-336 `.pt`) on timm's Eva: embedding + PuLID's five hidden states."""
    from .archs import pulid as arch

    try:
        return arch.build_eva_visual(source.weights())
    except (ValueError, RuntimeError, KeyError) as exc:
        raise bad_file(source.path, f"cannot be loaded as EVA02-CLIP ({str(exc).splitlines()[0]})") from None


@builder("arcface-irse50")
def _arcface_irse50(source: Source):
    """facexlib's ArcFace IR-SE50 (`recognition_arcface_ir_se50.pth`), InfiniteYou's recognizer: L2-normalised 512-d."""
    from .archs import arcface_irse as arch

    state = source.weights()
    if not arch.detect(state.keys()):
        raise bad_file(source.path, "is not facexlib's ArcFace IR-SE checkpoint (no input_layer / body.*.res_layer.5 "
                                    "SE / output_layer keys)")
    try:
        model = arch.build(state)
    except (ValueError, RuntimeError) as exc:
        raise bad_file(source.path, f"cannot be loaded as ArcFace IR-SE ({str(exc).splitlines()[0]})") from None
    # fp32 on every device, as the reference runs it (a small net; fp16 would move the embedding)
    return source.place(model, cast=False)


@builder("face-parser")
def _face_parser(source: Source):
    """BiSeNet face parsing (CelebAMask-HQ labels), portrait.core.parsing's network."""
    from .parsing import build_face_parser

    return build_face_parser(source)


@builder("onnx")
def _onnx(source: Source):
    """An onnxruntime.InferenceSession on `onnx_providers(ctx)`."""
    import onnxruntime

    path = source.verified()
    providers = onnx_providers(source.ctx)
    try:
        session = onnxruntime.InferenceSession(str(path), providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types for a bad file
        raise bad_file(path, f"is not a loadable ONNX model ({exc.__class__.__name__})") from None
    check_session(session, providers, path.name)
    return session


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


@builder("insightface")
def _insightface(source: Source, expect: str | None = None):
    """An ONNX file routed by insightface's model zoo (ArcFaceONNX, INSwapper, SCRFD, ...),
    prepared on `onnx_providers(ctx)`; `expect` names the class it must route to."""
    return insightface_model(source.verified(), source.ctx, expect)
