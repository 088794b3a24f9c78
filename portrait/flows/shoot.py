"""The shoot flow: one identity x the cells of a studio package, results grouped by cell.

    result = shoot("ana", "corporate", backdrops=["grey", "white"], outfits=["navy-suit", "blazer"],
                   keep=2, out="out/ana-corporate")

A package (portrait.stages.shoots) is a menu of backdrops, outfits and poses; a shoot renders
every chosen combination (a *cell*) for one person: `n` images per cell, or with `keep=K`
until K per cell are portraits to keep (the keep loop of portrait.flows.finish, reported per
cell). Each cell is an ordinary generate run (portrait.flows.generate) of the cell's
template, all on one warm RunContext, into `OUT/<cell folder>/` with its own results.json;
`OUT/shoot.json` lists the cells in order with their results and keep reports, and
`OUT/contact_sheet.png` shows one row per cell.

OUT is built in a staging folder beside it and published whole, like generate's: an
interrupted or failed shoot publishes nothing. The results history records every image
under one job id with its cell (portrait.flows.history).
"""

from __future__ import annotations

import dataclasses
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from portrait.core.config import Settings
from portrait.core.context import Progress, RunContext
from portrait.core.errors import BadInput, Interrupted, OutputFailed
from portrait.core.interrupt import signal_of
from portrait.core.io import as_published, check_replaceable, discard_dir, make_dirs, publish_dir, staging_for, write_json
from portrait.stages import shoots

from .generate import GenerationResult, generate
from .history import new_run_id, record_generation

SHOOT_FILE = "shoot.json"


@dataclass(frozen=True)
class CellResult:
    cell: shoots.Cell
    result: GenerationResult

    def as_json(self) -> dict[str, Any]:
        document = self.result.as_json()
        row = {**self.cell.as_dict(), "results": [{**r, "path": f"{self.cell.folder}/{r['path']}"}
                                                  for r in document["results"]]}
        for key in ("keep", "warnings"):
            if key in document:
                row[key] = document[key]
        return row


@dataclass(frozen=True)
class ShootResult:
    identity: str
    package: shoots.Package
    out: Path
    job: str
    backend: str
    seed: int
    cells: tuple[CellResult, ...]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def paths(self) -> list[Path]:
        return [p for c in self.cells for p in c.result.paths]

    @property
    def complete(self) -> bool:
        """Every cell has what was asked (with keep: K kept portraits each)."""
        return all((c.result.info.get("keep") or {}).get("complete", True) for c in self.cells)

    def as_json(self) -> dict[str, Any]:
        return {"identity": self.identity, "package": self.package.name, "title": self.package.title,
                "job": self.job, "backend": self.backend, "seed": self.seed, **self.info,
                "cells": [c.as_json() for c in self.cells]}


def shoot(identity: str, package: str | Path | shoots.Package, *, cells: Iterable[str] | None = None,
          backdrops: Iterable[str] | None = None, outfits: Iterable[str] | None = None,
          poses: Iterable[str] | None = None, n: int | None = None, keep: int | None = None,
          attempts: int | None = None, backend: str | None = None, seed: int | None = None, out: str | Path,
          settings: Settings | None = None, preset: str | None = None, ctx: RunContext | None = None,
          progress: Progress | None = None, finish: bool | dict[str, bool] = True,
          upscale_factor: float | None = None, job: str | None = None, **overrides: Any) -> ShootResult:
    """Render the chosen cells of `package` for `identity` into `out` (see the module docstring).

    `cells` names cells (`grey/navy-suit[/front]`); or choose `backdrops`, `outfits`, `poses`
    (their product); nothing chosen is every cell. `n`: images per cell (default: the
    package's count); `keep=K`: K kept portraits per cell instead, within `attempts` per cell.
    Every cell uses the same first seed (recorded; random when omitted). Other keyword
    arguments are generate's overrides (steps, guidance, width, height, options, ...).
    """
    pack = package if isinstance(package, shoots.Package) else shoots.find_package(package)
    chosen = shoots.select_cells(pack, None if cells is None else list(cells),
                                 backdrops=None if backdrops is None else list(backdrops),
                                 outfits=None if outfits is None else list(outfits),
                                 poses=None if poses is None else list(poses))
    if keep is not None and n is not None:
        raise BadInput("--n and --keep: give one (--keep K makes K portraits per cell that pass every check)")
    if keep is None:
        n = n if n is not None else pack.count
    _check_backend(backend)
    ctx = ctx or RunContext.create(settings, preset=preset, progress=progress)
    report = progress or ctx.progress
    out = Path(out).expanduser()
    check_out(out)
    seed = int(seed) if seed is not None else secrets.randbelow(2**31)
    job = job or new_run_id()
    staging = staging_for(out)
    done: list[CellResult] = []
    try:
        for index, cell in enumerate(chosen):
            report(f"cell {cell.key}", index, len(chosen))
            result = generate(identity, template=shoots.cell_template(cell), backend=backend, n=n, seed=seed,
                              out=staging / cell.folder, ctx=ctx, progress=progress, finish=finish, keep=keep,
                              attempts=attempts, upscale_factor=upscale_factor, job=job, cell=cell.as_dict(),
                              record=False, **overrides)
            done.append(CellResult(cell, result))
        report("cells", len(chosen), len(chosen))
        staged = ShootResult(done[0].result.identity, pack, out, job, done[0].result.backend, seed, tuple(done))
        write_json(staging / SHOOT_FILE, staged.as_json())
        if any(c.result.results for c in done):
            write_shoot_sheet(staging / "contact_sheet.png", done)
        publish_dir(staging, out)
    except OutputFailed as exc:
        raise as_published(exc, staging, out) from None
    except KeyboardInterrupt as exc:
        raise Interrupted(f"shoot stopped; nothing written to {out}", signal_of(exc)) from None
    finally:
        discard_dir(staging)
    final = []
    for c in done:
        folder = out / c.cell.folder
        moved = dataclasses.replace(c.result, out=folder, results=tuple(
            dataclasses.replace(r, path=folder / r.path.name) for r in c.result.results))
        record_generation(ctx.settings, moved, job=job, cell=c.cell.key)
        final.append(CellResult(c.cell, moved))
    return ShootResult(final[0].result.identity, pack, out, job, final[0].result.backend, seed, tuple(final))


def _check_backend(backend: str | None) -> None:
    if backend is None:
        return
    from portrait.stages.generate import backend_spec

    if backend_spec(backend).photo_template:
        raise BadInput(f"--backend {backend} paints into photo templates; a package's cells are style prompts "
                       f"(use a backend that takes a prompt)")


def check_out(out: Path) -> None:
    """OUT is replaced whole: new, empty, or an earlier shoot (never a folder of other files)."""
    if out.exists() and not out.is_dir():
        raise BadInput(f"{out}: --out exists and is not a folder")
    check_replaceable(out)
    if out.is_dir() and any(out.iterdir()) and not (out / SHOOT_FILE).is_file():
        raise BadInput(f"{out}: --out holds files that are not an earlier shoot; choose a new or empty folder")
    make_dirs(out.parent)


def write_shoot_sheet(target: Path, cells: Sequence[CellResult], thumb: int = 256) -> Path:
    """One row per cell: its kept (or ranked) portraits, then a crossed tile for each one the
    cell was short of (`--keep` could not keep enough within its budget)."""
    from portrait.core.formats.sheet import Tile, write_contact_sheet

    wanted = [int((c.result.info.get("keep") or {}).get("wanted") or len(c.result.results)) for c in cells]
    columns = max([1, *wanted, *(len(c.result.results) for c in cells)])
    tiles = []
    for cell, want in zip(cells, wanted):
        row = []
        for r in cell.result.results:
            colour = (60, 190, 90) if r.passed_gate else (220, 70, 60)
            scored = "" if r.score.similarity is None else f"  id {r.score.similarity:.3f}"
            row.append(Tile(r.candidate.image, ((cell.cell.title[:40], (235, 235, 235)),
                                                (f"#{r.rank}  seed {r.candidate.seed}{scored}", colour)),
                            frame=colour))
        while len(row) < max(want, 1):
            row.append(Tile(None, ((cell.cell.title[:40], (235, 235, 235)), ("not kept", (220, 70, 60)))))
        tiles += row
    return write_contact_sheet(target, tiles, thumb=thumb, columns=columns)
