"""`portrait plan`: will this request run on my card? The memory plan, before any download.

Only composes the library call (portrait.flows.plan); every decision lives there.
"""

from __future__ import annotations

from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("plan")
    def plan_cmd(
        ctx: typer.Context,
        backend: Optional[str] = typer.Option(None, "--backend", "-b", help="Generation backend (default: the preset's)."),
        size: Optional[str] = typer.Option(None, "--size", help="WIDTHxHEIGHT (default: the preset's resolution, square)."),
        vram: Optional[float] = typer.Option(None, "--vram", help="Your card's memory in GB (default: 8, 12, 16, 24, 48 and 80 GB)."),
        batch: int = typer.Option(1, "--batch", help="Images per pipeline call."),
        ram: Optional[float] = typer.Option(None, "--ram", help="Host RAM in GB that offloaded weights may use (default: this machine's available RAM)."),
        no_bf16: bool = typer.Option(False, "--no-bf16", help="Plan for a card without bf16 (T4, V100, GTX 10xx/16xx)."),
        option: list[str] = typer.Option([], "--option", help="A backend option KEY=VALUE that picks models (e.g. infiniteyou_variant=sim_stage1)."),
        no_finish: bool = typer.Option(False, "--no-finish", help="Plan generation alone, without the finishing models (as generate --no-finish)."),
        json_out: bool = typer.Option(False, "--json", help="Print the plans as JSON."),
    ) -> None:
        """Predicted peak GPU memory and the placement chosen (resident / offload / quantized) on each card."""
        from rich.table import Table

        from portrait.core.memplan import NAMES
        from portrait.flows.plan import plan

        def mp_names(dtype: str) -> str:
            return NAMES.get(dtype, dtype)

        from .declared import key_values
        from .tables import show

        report = plan(backend=backend, size=size, vram=vram, batch=batch, bf16=not no_bf16, host_ram_gb=ram,
                      options=key_values(option, "--option"), settings=ctx.obj, finish=not no_finish)
        if json_out:
            import json

            print(json.dumps(report.as_dict(), indent=2))
            return
        ram_text = f"{report.host_ram_gb:.0f} GB host RAM" if report.host_ram_gb else "host RAM unknown"
        table = Table(title=f"plan: preset {report.preset}, backend {report.backend}, {report.width}x{report.height}, "
                            f"batch {report.batch}, {ram_text}{', no bf16' if no_bf16 else ''}")
        columns = ("card", "fits", "placement", "dtype", "quantize", "peak_gb", "max_batch")
        for column in columns:
            table.add_column(column.replace("_", " "))
        for row in report.rows():
            table.add_row(*(row[c] for c in columns), style=None if row["fits"] == "yes" else "yellow")
        show(table)
        chosen = next((p for p in report.plans if p.fits), report.plans[-1])
        parts = Table(title=f"modules ({chosen.card}: {chosen.strategy})")
        for column in ("module", "model", "role", "where", "dtype", "GB", "sized from"):
            parts.add_column(column)
        for placed in chosen.parts:
            parts.add_row(placed.part.name, placed.part.model_id, placed.part.role, placed.where,
                          placed.quantize or mp_names(placed.dtype),
                          f"{placed.bytes / 2**30:.2f}", placed.part.source)
        show(parts)
        for p in report.plans:
            if not p.fits:
                print(f"{p.card}: {p.refusal}")
