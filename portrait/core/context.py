"""RunContext: what every stage that loads models is handed (never read from globals).

The front doors (CLI, API, batch runner) build one RunContext and pass it down. Stages
take what they need from it: the registry to resolve ids, the cache to reuse loaded
models, the placement for device and dtype, and a progress callback.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

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
            placement=placement(settings.device, precision),
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
