"""What made an output: package versions and the device and dtype, recorded in every output.

An image is reproducible only with the stack that rendered it: the same seed gives other
pixels under another diffusers scheduler implementation, another torch kernel or fp16
instead of fp32. Every generated PNG's `portrait` chunk and every results.json carry
`versions()`. Versions come from installed distribution metadata (importlib.metadata), so
nothing heavy is imported to read them.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

STACK = ("torch", "diffusers", "transformers", "peft")


@lru_cache(maxsize=1)
def package_versions() -> dict[str, str | None]:
    """portrait and the model stack's versions (None for a package that is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    import portrait

    found: dict[str, str | None] = {"portrait": portrait.__version__}
    for name in STACK:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def versions(placement: Any) -> dict[str, Any]:
    """package_versions() plus where it ran: `device` and `dtype` of the run's Placement."""
    return {**package_versions(), "device": placement.device, "dtype": placement.dtype_name}
