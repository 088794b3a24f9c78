"""Every kind of model portrait builds, listed once: kind -> where its `Kind` is declared.

Each architecture module (portrait/core/archs/<x>.py) holds a network (pure torch, no pipeline
knowledge), its detection by state-dict keys and its builder from a `Source`, declared as a
`Kind` (portrait/core/modelfiles.py), the way spandrel's architecture modules pair an id, a
detect rule and a load. This table is the one place kinds are listed (no import side effect
registers one); its strings are imported on first use, so listing a kind costs no torch import.
`register` adds a kind at run time (a plugin, a test backend that lives in one file).
"""

from __future__ import annotations

import importlib
import threading

from ..errors import PortraitError
from ..modelfiles import Kind

KINDS: dict[str, str] = {
    # state dicts and ONNX files, whatever they hold
    "weights": "portrait.core.archs.generic:WEIGHTS",
    "onnx": "portrait.core.archs.generic:ONNX",
    "insightface": "portrait.core.archs.generic:INSIGHTFACE",
    # diffusers parts of a base
    "components": "portrait.core.archs.diffusers:COMPONENTS",
    "vae": "portrait.core.archs.diffusers:VAE",
    "controlnet": "portrait.core.archs.diffusers:CONTROLNET",
    # identity adapters and encoders
    "ip-adapter": "portrait.core.archs.ip_adapter:IP_ADAPTER",
    "photomaker-checkpoint": "portrait.core.archs.photomaker:CHECKPOINT",
    "photomaker": "portrait.core.archs.photomaker:ENCODER",
    "pulid": "portrait.core.archs.pulid:PULID",
    "pulid-flux": "portrait.core.archs.pulid:PULID_FLUX",
    "eva-clip": "portrait.core.archs.pulid:EVA_CLIP",
    "infiniteyou-projection": "portrait.core.archs.infiniteyou:PROJECTION",
    "arcface-irse50": "portrait.core.archs.arcface_irse:ARCFACE_IRSE50",
    "recognizer": "portrait.core.archs.recognizer:RECOGNIZER",
    "clip-vision": "portrait.core.archs.clip:CLIP_VISION",
    "clip-score": "portrait.core.archs.clip:CLIP_SCORE",
    # analysis, finishing, annotators
    "face-parser": "portrait.core.archs.bisenet:FACE_PARSER",
    "segmenter": "portrait.core.archs.segmenter:SEGMENTER",
    "spandrel": "portrait.core.archs.restorers:SPANDREL",
    "openpose": "portrait.core.archs.annotators:OPENPOSE",
    "midas": "portrait.core.archs.annotators:MIDAS",
}

_REGISTERED: dict[str, Kind] = {}
_lock = threading.Lock()


def register(kind: Kind) -> Kind:
    """Add (or replace) a kind at run time; the table's own kinds need no call."""
    with _lock:
        _REGISTERED[kind.name] = kind
    return kind


def unregister(name: str) -> None:
    with _lock:
        _REGISTERED.pop(name, None)


def kind(name: str) -> Kind:
    """The `Kind` for `name`: registered at run time, else the table's (imported now)."""
    found = _REGISTERED.get(name)
    if found is not None:
        return found
    target = KINDS.get(name)
    if target is None:
        known = ", ".join(sorted({*KINDS, *_REGISTERED}))
        raise PortraitError(f"no model builder is registered for kind '{name}' (known: {known})")
    module_name, attr = target.split(":")
    found = getattr(importlib.import_module(module_name), attr)
    if found.name != name:  # a table row pointing at another kind's declaration is a typo
        raise PortraitError(f"{target} declares kind '{found.name}', listed as '{name}'")
    return found


def all_kinds() -> dict[str, Kind]:
    return {name: kind(name) for name in sorted({*KINDS, *_REGISTERED})}
