"""`portrait.plan(...)` / `portrait plan`: will this request run on my card, and how?

For a preset, backend, size and batch: the predicted peak GPU memory and the placement the
memory plan chooses (resident, model / group / sequential offload, which part quantized) on 8,
12, 16, 24, 48 and 80 GB cards, or the card given. Nothing is downloaded and no weight is
loaded: parts are sized from safetensors headers when present, else from the family's shipped
configs or the registry's recorded sizes (portrait/core/memplan.py, stages/planning.py).

    report = portrait.plan(preset="flux", backend="infiniteyou", size="1024x1024", vram=24)
    print(report.plans[0].strategy, report.plans[0].peak / 2**30)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from portrait.core import memplan as mp
from portrait.core.config import Settings
from portrait.core.context import RunContext
from portrait.core.errors import BadInput


@dataclass(frozen=True)
class PlanReport:
    preset: str
    backend: str
    width: int
    height: int
    batch: int
    host_ram_gb: float | None
    bf16: bool
    plans: tuple[mp.MemoryPlan, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"preset": self.preset, "backend": self.backend, "size": f"{self.width}x{self.height}",
                "batch": self.batch, "host_ram_gb": self.host_ram_gb, "bf16": self.bf16,
                "plans": [p.as_dict() for p in self.plans]}

    def rows(self) -> list[dict[str, Any]]:
        """One row per card: what the table prints."""
        out = []
        for p in self.plans:
            quant = ", ".join(f"{k} {v}" for k, v in p.quantize.items()) or "-"
            out.append({"card": p.card, "fits": "yes" if p.fits else "no", "placement": p.strategy if p.fits else
                        "refused", "dtype": mp.NAMES.get(p.dtype, p.dtype), "quantize": quant,
                        "peak_gb": f"{mp.gb(p.peak):.1f}", "max_batch": str(p.max_batch) if p.fits else "-"})
        return out


def parse_size(value: str | Sequence[int] | None, default: int) -> tuple[int, int]:
    if value is None:
        return default, default
    if not isinstance(value, str):
        w, h = value
        return int(w), int(h)
    try:
        w, h = value.lower().split("x")
        width, height = int(w), int(h)
    except ValueError:
        raise BadInput(f"--size '{value}': use WIDTHxHEIGHT, e.g. 1024x1024") from None
    if not (64 <= width <= 8192 and 64 <= height <= 8192):
        raise BadInput(f"--size '{value}': each side must be between 64 and 8192 px")
    return width, height


def plan(preset: str | None = None, backend: str | None = None, size: str | Sequence[int] | None = None, *,
         vram: float | Sequence[float] | None = None, batch: int = 1, bf16: bool = True,
         host_ram_gb: float | None = None, options: Mapping[str, Any] | None = None,
         settings: Settings | None = None, finish: bool = True) -> PlanReport:
    """The memory plan of a request on each card (default 8/12/16/24/48/80 GB): no download, no load.

    `host_ram_gb`: the host RAM offloaded weights may take (default: this machine's available
    RAM). `bf16=False` plans for a card without bf16 (T4, V100). `finish`: count the finishing
    models the preset's and backend's switches run (face analysis, upscaler, restorer, CLIP), as
    `generate` does; False plans generation alone (`generate --no-finish`)."""
    from portrait.stages.generate import GeneratePolicy, backend_spec
    from portrait.stages.planning import offload_setting, plan_request_for

    settings = (settings or Settings()).with_(device="cpu")  # a plan touches no GPU
    if settings.preset and preset is None:
        preset = settings.preset
    ctx = RunContext.create(settings, preset=preset)
    policy = GeneratePolicy.from_preset(ctx.preset)
    backend = backend or policy.backend
    spec = backend_spec(backend)
    if ctx.preset.family not in spec.families:
        raise BadInput(f"--backend {backend} runs on {', '.join(spec.families)}; preset '{ctx.preset.name}' is "
                       f"{ctx.preset.family}")
    if isinstance(batch, bool) or not isinstance(batch, int) or not 1 <= batch <= 64:
        raise BadInput(f"--batch {batch}: use a whole number from 1 to 64")
    width, height = parse_size(size, int(policy.resolution))
    cards = mp.CARDS_GB if vram is None else ((vram,) if isinstance(vram, (int, float)) else tuple(vram))
    for card in cards:
        if not 1 <= float(card) <= 4096:
            raise BadInput(f"--vram {card}: give the card's memory in GB (e.g. 24)")
    ram = host_ram_gb if host_ram_gb is not None else mp.host_ram_bytes() / mp.GIB
    if ram is not None and ram <= 0:
        raise BadInput(f"--ram {ram}: give the host's RAM in GB")
    force = offload_setting(dict(policy.memory).get("offload", "auto"))
    finishing = None
    if finish:
        from portrait.flows.finish import FinishPolicy, FinishSwitches, finishing_plan

        finish_policy = FinishPolicy.from_preset(ctx.preset)
        switches = FinishSwitches.from_options(finish_policy.switches, dict(spec.finish),
                                               spec.read(dict(options or {})).finish or {})
        finishing = finishing_plan(ctx, switches, finish_policy)
    plans = tuple(plan_request_for(ctx, backend, width, height, options=options, batch=batch, force=force,
                                   budget=mp.Budget.card(float(c), bf16=bf16, host_ram_gb=ram), finishing=finishing)
                  for c in cards)
    return PlanReport(ctx.preset.name, backend, width, height, batch, ram, bf16, plans)
