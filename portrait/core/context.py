"""RunContext: what every stage that loads models is handed (never read from globals).

The front doors (CLI, API, batch runner) build one RunContext and pass it down. Stages
take what they need from it: the registry to resolve ids, the cache to reuse loaded
models, the placement for device and dtype, and a progress callback.

`create` picks the device and the family's dtype only. Where each module goes (resident, CPU
offload, quantized) is the request's memory plan (portrait.core.memplan), made by the generate
stage before any model loads; `planned(plan)` is the context that follows it (same registry and
cache, the plan's dtype and strategy).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

from .cache import ModelCache
from .config import Preset, RuntimePolicy, Settings, load_preset
from .device import Placement, placement
from .registry import Registry, ResolvedModel

Progress = Callable[[str, float, float], None]  # (what, done, total)


def _no_progress(what: str, done: float, total: float) -> None:
    return None


@dataclass
class RunContext:
    settings: Settings
    preset: Preset
    registry: Registry
    cache: ModelCache
    placement: Placement
    progress: Progress = field(default=_no_progress)
    plan: Any = None  # the request's MemoryPlan (portrait.core.memplan), once made

    def planned(self, plan) -> "RunContext":
        """This context under a memory plan: the plan's dtype and offload strategy, same cache."""
        from .device import with_strategy

        return dataclasses.replace(self, placement=with_strategy(self.placement, plan.dtype, plan.strategy), plan=plan)

    @classmethod
    def create(cls, settings: Settings | None = None, preset: str | None = None, cache: ModelCache | None = None,
               progress: Progress | None = None) -> "RunContext":
        from .licenses import strictest

        settings = settings or Settings()
        chosen = load_preset(preset or settings.preset)
        # the stricter of the user's --license and the preset's `license:` holds for the whole run
        settings = settings.with_(license=strictest(settings.license, chosen.license))
        precision = RuntimePolicy.from_preset(chosen).precision
        return cls(
            settings=settings,
            preset=chosen,
            registry=Registry.load(),
            cache=cache or ModelCache(),
            placement=placement(settings.device, precision, chosen.family),
            progress=progress or _no_progress,
        )

    def resolve(self, model_id: str) -> ResolvedModel:
        """Resolve through the registry, honouring the preset's tiny switch, and check the
        files against their recorded sha256 (once per size and mtime; portrait.core.integrity)."""
        from .integrity import check_model

        resolved = self.registry.resolve(model_id, self.settings, tiny=self.preset.tiny)
        if resolved.origin != "explicit":
            check_model(resolved.spec, resolved.root, self.settings.home)
        return resolved

    def resolve_role(self, role: str) -> ResolvedModel:
        return self.resolve(self.preset.model(role))
