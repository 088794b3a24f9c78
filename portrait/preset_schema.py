"""The preset schema: which declaration reads which section, and every preset checked whole.

Each setting is declared once, as a field of the policy that reads it (portrait.core.declare);
this module only says which policies read which top-level section, so that a front door can
check a whole preset file before any work (a `treshold:` typo in `train:` fails `portrait
generate` too, exit 2, naming the file, section and key), and so that `portrait presets show
NAME` and the service's `GET /v1/presets/{name}` print the declared schema (type, default,
bounds, help) next to the preset's values, from the declarations themselves.

Why here, above the flows, the studio and the service: a preset configures every layer, and the
foundation (portrait.core.config, which reads the file and checks its top-level keys) may not
import the layers above it. The CLI and the service load presets through `load`; the flows build
their own sections' policies with the same builder, so the Python API refuses the same typos
in every section it reads.
"""

from __future__ import annotations

from typing import Any

from portrait.core.config import PRESET_SECTIONS, Preset, available_presets, load_preset
from portrait.core.declare import from_preset, jsonable, preset_label, schema


def sections() -> dict[str, tuple[type, ...]]:
    """Top-level section -> the declarations that read it (several for `prepare`, whose keys
    are checked against their union)."""
    from portrait.core.config import RuntimePolicy
    from portrait.flows.finish import FinishPolicy
    from portrait.flows.prepare import PREPARE_READERS
    from portrait.service.policy import ServicePolicy
    from portrait.stages.generate import GeneratePolicy
    from portrait.stages.score import ScorePolicy
    from portrait.stages.train import TrainPolicy
    from portrait.studio.runner import StudioPolicy

    table = {"runtime": (RuntimePolicy,), "prepare": PREPARE_READERS, "train": (TrainPolicy,),
             "generate": (GeneratePolicy,), "finish": (FinishPolicy,), "score": (ScorePolicy,),
             "studio": (StudioPolicy,), "service": (ServicePolicy,)}
    assert tuple(table) == PRESET_SECTIONS, "every preset section needs its declarations here"
    return table


def check(preset: Preset) -> dict[str, dict[str, Any]]:
    """Every policy of every section built from the preset (BadInput on the first bad key or
    value): section -> {declaration name: policy}."""
    built: dict[str, dict[str, Any]] = {}
    for name, readers in sections().items():
        built[name] = {cls.__name__: from_preset(cls, preset, shared=readers) for cls in readers}
    return built


def load(name: str) -> Preset:
    """A preset by name or file, checked whole against the declarations."""
    preset = load_preset(name)
    check(preset)
    return preset


def show(name: str) -> dict[str, Any]:
    """The declared schema of every section, with this preset's value where it differs from
    the default (what `portrait presets show` prints and `/v1/presets/{name}` returns)."""
    preset = load_preset(name)
    built = check(preset)
    out: dict[str, Any] = {"name": preset.name, "source": preset_label(preset), "family": preset.family,
                           "tiny": preset.tiny, "description": preset.description, "license": preset.license,
                           "models": dict(preset.models), "sections": {}}
    for section, readers in sections().items():
        rows = []
        for cls in readers:
            for row in schema(cls, built[section][cls.__name__]):
                rows.append({**row, "declared_in": f"{cls.__module__}.{cls.__qualname__}"})
        out["sections"][section] = rows
    return jsonable(out)


def catalogue() -> list[dict[str, Any]]:
    """Every shipped preset: name, family, tiny, description, license."""
    rows = []
    for name in available_presets():
        preset = load_preset(name)
        rows.append({"name": name, "family": preset.family, "tiny": preset.tiny, "description": preset.description,
                     "license": preset.license})
    return rows
