"""Upscalers and face restorers (kind "spandrel"): whatever architecture spandrel detects from a
state dict (Real-ESRGAN, GFPGAN, CodeFormer, ...); spandrel's own registry does the detection."""

from __future__ import annotations

from ..errors import bad_file
from ..modelfiles import Kind, read_weights_file


def _build_spandrel(source):
    """Any architecture spandrel detects from a state dict (Real-ESRGAN, GFPGAN, CodeFormer, ...);
    fp16/bf16 on CUDA only where the architecture supports it, else fp32 there."""
    import spandrel

    placement = source.ctx.placement
    state = spandrel.canonicalize_state_dict(_checked_state_dict(source))
    descriptor = spandrel.ModelLoader(device="cpu").load_from_state_dict(state)
    cast = placement.is_cuda and _supports(descriptor, placement.dtype_name)  # e.g. GFPGAN has no fp16
    return source.place(descriptor, cast=cast).eval()


def _checked_state_dict(source) -> dict:
    """The checkpoint, hash-checked against the registry, loaded with weights_only=True.

    A file converted by `portrait models import-ncnn` differs from the upstream bytes by
    construction; it is checked against the hash its import recorded instead.
    """
    from ..io import sha256_file
    from ..ncnn import imported_hash

    path = source.path
    recorded = imported_hash(source.resolved.root, path.name)
    if recorded is None:
        return source.weights()
    if sha256_file(path) != recorded:
        raise bad_file(path, "does not match the hash recorded by its ncnn import; run `portrait models import-ncnn` again")
    return read_weights_file(path)


def _supports(descriptor, dtype_name: str) -> bool:
    if dtype_name == "float16":
        return bool(descriptor.supports_half)
    if dtype_name == "bfloat16":
        return bool(descriptor.supports_bfloat16)
    return True


SPANDREL = Kind("spandrel", _build_spandrel)
