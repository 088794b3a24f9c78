"""`portrait results`: the results history of an identity (every portrait made of it, every run).

Only composes the library (portrait.flows.history); the index lives in HOME/results.db.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

results_app = typer.Typer(help="The results history: list, star, download (zip) and delete an identity's portraits.",
                          no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(results_app, name="results")


def _history(ctx: typer.Context):
    from portrait.flows.history import History

    return History(ctx.obj)


@results_app.command("list")
def list_results(
    ctx: typer.Context,
    identity: str = typer.Argument(..., help="Identity name."),
    page: int = typer.Option(1, "--page", min=1, help="Page number (newest first)."),
    per_page: int = typer.Option(24, "--per-page", min=1, max=100, help="Results per page."),
    job: Optional[str] = typer.Option(None, "--job", help="Only this run's results."),
    starred: bool = typer.Option(False, "--starred", help="Only starred results."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON (with the files' paths)."),
) -> None:
    """An identity's portraits, newest run first: id, job, backend, template, cell, scores, star."""
    import json
    import time

    found = _history(ctx).page(identity, page=page, per_page=per_page, job=job, starred=True if starred else None)
    if json_out:
        data = found.as_dict()
        for row, result in zip(data["results"], found.rows):
            row["path"] = str(result.path)
        print(json.dumps(data, indent=2))
        return
    from rich.table import Table

    from .tables import show

    table = Table(title=f"{identity}: {found.total} result(s), page {page}")
    for column in ("id", "job", "when", "backend", "template", "cell", "seed", "similarity", "star", "file"):
        table.add_column(column)
    for r in found.rows:
        sim = "-" if r.similarity is None else f"{r.similarity:.3f}" + ("" if r.passed_gate else " (below gate)")
        table.add_row(r.id, r.job, time.strftime("%Y-%m-%d %H:%M", time.localtime(r.created)), r.backend or "-",
                      r.template or "-", r.cell or "-", str(r.seed), sim, "*" if r.starred else "",
                      str(r.path) if r.present else f"{r.path} (gone)")
    show(table)


@results_app.command("star")
def star_results(ctx: typer.Context, identity: str = typer.Argument(...), ids: list[str] = typer.Argument(...),
                 off: bool = typer.Option(False, "--off", help="Remove the star instead.")) -> None:
    """Star (or with --off unstar) results by id."""
    count = _history(ctx).star(identity, ids, on=not off)
    print(f"{'unstarred' if off else 'starred'} {count} result(s)")


@results_app.command("zip")
def zip_results(ctx: typer.Context, identity: str = typer.Argument(...), ids: list[str] = typer.Argument(...),
                out: Path = typer.Option(..., "--out", "-o", help="The zip file to write.")) -> None:
    """The chosen results and a results.json describing them, as one zip."""
    from portrait.core.io import write_bytes

    data = _history(ctx).zip(identity, ids)
    write_bytes(out, data)
    print(f"wrote {out} ({len(data):,} bytes)")


@results_app.command("delete")
def delete_results(ctx: typer.Context, identity: str = typer.Argument(...), ids: list[str] = typer.Argument(...)) -> None:
    """Delete results by id: their files, and their rows in the history and in results.json."""
    receipt = _history(ctx).delete(identity, ids)
    print(f"deleted {len(receipt['deleted'])} result(s), {receipt['files_removed']} file(s) removed")
