"""`portrait shoot`: a studio package's backdrops x outfits (x poses) for one identity.

Only composes the library call (portrait.flows.shoot); every decision lives there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .declared import collect, declared_options


def _names(value: Optional[str]) -> list[str] | None:
    """`grey,white` -> ["grey", "white"]; None when the option was not given."""
    if value is None:
        return None
    return [part.strip() for part in value.split(",") if part.strip()]


def register(app: typer.Typer) -> None:
    @app.command("shoot")
    @declared_options(exclude=("composition",))
    def shoot_cmd(
        ctx: typer.Context,
        identity: str = typer.Option(..., "--identity", "-i", help="Identity name (HOME/identities/NAME)."),
        package: str = typer.Option(..., "--package", help="A studio package (see `portrait packages`), or a package .yaml file."),
        out: Path = typer.Option(..., "--out", "-o", help="Output folder: one subfolder per cell, shoot.json, contact_sheet.png."),
        cells: Optional[str] = typer.Option(None, "--cells", help="Cells to render, comma-separated: backdrop/outfit (or backdrop/outfit/pose), e.g. grey/navy-suit,white/blazer."),
        backdrops: Optional[str] = typer.Option(None, "--backdrops", help="Only these backdrops (comma-separated); with --outfits/--poses, their product."),
        outfits: Optional[str] = typer.Option(None, "--outfits", help="Only these outfits (comma-separated)."),
        poses: Optional[str] = typer.Option(None, "--poses", help="Only these poses (comma-separated)."),
        n: Optional[int] = typer.Option(None, "--n", "-n", min=1, help="Images per cell (default: the package's count)."),
        keep: Optional[int] = typer.Option(None, "--keep", min=1, help="Make K portraits per cell that pass every check (a face, alike in the independent space, no copy of a photo, sharp, well exposed); instead of --n."),
        attempts: Optional[int] = typer.Option(None, "--attempts", min=1, help="With --keep: the most candidates to try per cell (default K x the preset's score.keep_attempts)."),
        backend: Optional[str] = typer.Option(None, "--backend", "-b", help="Generation backend (default: the preset's); one that takes a prompt."),
        seed: Optional[int] = typer.Option(None, "--seed", help="First seed of every cell. Random when omitted (recorded)."),
        no_finish: bool = typer.Option(False, "--no-finish", help="Skip fusion / retouch / upscale / scoring and the gate."),
        no_fuse: bool = typer.Option(False, "--no-fuse", help="Skip the final face fusion."),
        no_retouch: bool = typer.Option(False, "--no-retouch", help="Skip skin retouch."),
        no_upscale: bool = typer.Option(False, "--no-upscale", help="Skip super-resolution."),
        restore: Optional[bool] = typer.Option(None, "--restore/--no-restore", help="Face restoration (GFPGAN). When the restorer cannot run, one line says why."),
        upscale_factor: Optional[float] = typer.Option(None, "--upscale-factor", help="Final upscale factor (preset key finish.upscale.outscale)."),
        **declared,  # --size, --steps, --guidance, --option, ...: generated from portrait.core.request (cli/declared.py)
    ) -> None:
        """Render a studio package's cells (backdrop x outfit x pose) for IDENTITY into OUT, grouped by cell."""
        from portrait.flows.shoot import shoot

        from .cmd_generate import finish_switches, print_result, progress_bar

        overrides = collect(declared)
        finish = finish_switches(no_finish, no_fuse=no_fuse, no_retouch=no_retouch, no_upscale=no_upscale,
                                 restore=restore)
        with progress_bar(1) as progress:
            result = shoot(identity, package, cells=_names(cells), backdrops=_names(backdrops),
                           outfits=_names(outfits), poses=_names(poses), n=n, keep=keep, attempts=attempts,
                           backend=backend, seed=seed, out=out, settings=ctx.obj, progress=progress, finish=finish,
                           upscale_factor=upscale_factor, **overrides)
        warned: set[str] = set()
        for cell in result.cells:
            print(f"{cell.cell.key}  ({cell.cell.title})")
            warnings = [w for w in cell.result.info.get("warnings") or () if w not in warned]
            warned.update(warnings)
            print_result(dataclasses_replace_info(cell.result, warnings), indent="  ")
        print(f"shoot {result.job}: {len(result.cells)} cell(s), {len(result.paths)} image(s) in {result.out} "
              f"(shoot.json, contact_sheet.png)")

    @app.command("packages")
    def packages_cmd(json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
        """The studio packages that ship with portrait: backdrops, outfits, poses."""
        import json

        from portrait.stages.shoots import shipped_packages

        rows = [p.as_dict() for p in shipped_packages()]
        if json_out:
            print(json.dumps(rows, indent=2))
            return
        from rich.table import Table

        from .tables import show

        table = Table()
        for column in ("name", "title", "backdrops", "outfits", "poses", "cells", "count"):
            table.add_column(column)
        for row in rows:
            table.add_row(row["name"], row["title"], ", ".join(e["name"] for e in row["backdrops"]),
                          ", ".join(e["name"] for e in row["outfits"]), ", ".join(e["name"] for e in row["poses"]) or "-",
                          str(row["cells"]), str(row["count"]))
        show(table)


def dataclasses_replace_info(result, warnings: list[str]):
    """The cell's result with only the warnings not printed yet (one line per warning per shoot)."""
    import dataclasses

    return dataclasses.replace(result, info={**result.info, "warnings": warnings})
