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
3. build: the `Kind` listed for `kind` in portrait/core/archs/__init__.py (its builder lives in
   the architecture module beside its key detection) turns the files into an object (the way
   insightface's model router turns an ONNX file into the right class);
4. place and cache: modules go to ctx's device, cast to its dtype on CUDA (fp16/bf16;
   fp32 on CPU), left on the CPU for pipeline parts when the preset asks for offload, and
   the result is kept in ctx.cache under one key scheme:
   `CacheKey(resolved id, device, dtype, (kind, file, explicit file stamp, args))`.

A loading failure on a user's file (OSError, ValueError, KeyError, RuntimeError from the
library) becomes one line naming the model, exit 2; a missing model is exit 3 naming
`portrait models download ID`.

Every kind is declared once, in its architecture module (portrait/core/archs/<x>.py: the
network, its detection by state-dict keys and its builder), and listed in one table
(portrait/core/archs/__init__.py); none registers by import side effect. `kinds()` lists them.
The builders' shared half (Source, verify, read_weights, place) is portrait/core/modelfiles.py,
below the architectures; this module is the door above them. Heavy imports stay inside builders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from . import archs
from .cache import CacheKey
from .modelfiles import (CPU_PROVIDER, CUDA_PROVIDER, ONNX_FALLBACKS, PICKLE_SUFFIXES, ClipVision,  # noqa: F401
                         Kind, Source, Weights, check_insightface, check_session, cuda_index, friendly,
                         insightface_model, mapped_pickle, onnx_ctx_id, onnx_fallback, onnx_providers,
                         onnx_session, place, read_weights, read_weights_file, verify)
from .modelspec import ResolvedModel


def builder(kind: str, *, place: bool = False, offloaded: bool = False):
    """Register `fn(source, **args)` for `kind` at run time (a plugin, a test): the same as
    `portrait.core.archs.register(Kind(kind, fn, ...))`. The project's own kinds are listed in
    portrait/core/archs/__init__.py instead, beside no import side effect."""

    def register(fn):
        archs.register(Kind(kind, fn, place=place, offloaded=offloaded))
        return fn

    return register


def kinds() -> dict[str, str]:
    """Every kind (listed and registered) and its one-line help."""
    return {name: k.help for name, k in sorted(archs.all_kinds().items())}


# --- resolve, cache --------------------------------------------------------------------------


def resolve(ctx, model_id: str, path: Path | str | None = None) -> ResolvedModel:
    """A registry id (honouring the tiny switch, license policy and recorded hashes), or the
    user's own file or folder `path`, described by `model_id`'s registry entry."""
    if path is None:
        return ctx.resolve(model_id)
    # a missing path is the registry's one line: "<path>: no such file or folder (given for model 'ID')"
    return ctx.registry.resolve(model_id, ctx.settings, tiny=ctx.preset.tiny, explicit=Path(path).expanduser())


def cache_key(ctx, model_id: str, kind: str, *variant: Any) -> CacheKey:
    """The one key scheme: (resolved id, device, dtype, (kind, *variant))."""
    return CacheKey(model_id, ctx.placement.device, ctx.placement.dtype_name, (kind, *variant))


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
    entry = archs.kind(kind)
    resolved = resolve(ctx, model_id, path)  # every call: the run's bill of materials records it
    explicit = Path(path).expanduser() if path is not None else None
    source = Source(ctx, resolved, file, explicit, door=load)
    key = cache_key(ctx, resolved.spec.id, kind, file, _stamp(explicit), _freeze(args))
    if entry.offloaded or kind == "components":  # placed per the plan's strategy: one copy per strategy
        key = CacheKey(key.model_id, key.device, key.dtype, (*key.variant, getattr(ctx.placement, "strategy", "resident")))

    def factory():
        built = entry.build(source, **args)
        return place(ctx, built, offloaded=entry.offloaded) if entry.place else built

    return ctx.cache.get(key, friendly(factory, model_id))
