"""portrait: an identity-preserving portrait studio.

The Python API mirrors the CLI:

    import portrait
    report = portrait.prepare(["photos/"], out="prepared/")
    identity = portrait.train(["photos/"], name="alice")
    results = portrait.generate("alice", template="business", n=4, out="out/")
    report = portrait.plan(preset="flux", backend="infiniteyou", size="1024x1024", vram=24)
    edited = portrait.edit(results.paths[0], prompt="a sunny beach behind her", out="out/beach")
    report = portrait.evaluate(["out/"], out="out/eval")   # HTML + JSON comparison of runs
    studio = portrait.Studio("jobs.db"); studio.run("spec.yaml")

Names are imported lazily so `import portrait` stays cheap (no torch until needed).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "prepare": "portrait.flows.prepare:prepare",
    "train": "portrait.flows.train:train",
    "generate": "portrait.flows.generate:generate",
    "plan": "portrait.flows.plan:plan",
    "edit": "portrait.flows.edit:edit",
    "evaluate": "portrait.flows.evaluate:evaluate",
    "Studio": "portrait.studio.api:Studio",
    "Settings": "portrait.core.config:Settings",
    "load_identity": "portrait.core.bundle:load_identity",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    target = _EXPORTS.get(name)
    if target is None:
        raise AttributeError(f"module 'portrait' has no attribute '{name}'")
    module_name, attr = target.split(":")
    return getattr(importlib.import_module(module_name), attr)
