"""`portrait prepare PHOTOS... --out DIR`: rank, filter and prepare one person's photos."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from portrait.core.config import Settings


def register(app: typer.Typer) -> None:
    @app.command("prepare")
    def prepare_command(
        ctx: typer.Context,
        photos: List[Path] = typer.Argument(..., help="Photo files, folders or zip archives of one person."),
        out: Path = typer.Option(..., "--out", "-o", help="Output folder (report.json, train/, contact_sheet.png)."),
        face_backend: Optional[str] = typer.Option(
            None, "--face-backend", help="auto, dlib, insightface:antelopev2 or insightface:buffalo_l (default: preset)."),
        top_k: Optional[int] = typer.Option(None, "--top-k", min=1, help="How many of the best photos to train on."),
        whiten: Optional[bool] = typer.Option(None, "--whiten-background/--keep-background", help="White background behind the person in the training crops (default: the preset's prepare.whiten_background)."),
    ) -> None:
        """Find the person in most photos, reject the rest with a reason, and write aligned crops."""
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from portrait.flows.prepare import prepare

        settings: Settings = ctx.obj or Settings()
        console = Console(stderr=True)
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, transient=True) as bar:
            tasks: dict[str, int] = {}

            def report(what: str, done: float, total: float) -> None:
                if what not in tasks:
                    tasks[what] = bar.add_task(what, total=total)
                bar.update(tasks[what], completed=done, total=total)

            result = prepare(photos, out, settings=settings, face_backend=face_backend, top_k=top_k, progress=report,
                             whiten_background=whiten)
        summary = result.report
        typer.echo(f"kept {summary['kept']}, rejected {summary['rejected']} "
                   f"(face backend {result.face_backend}); training images: {len(result.training_set.images)}")
        for row in summary["photos"]:
            if row["status"] == "rejected":
                detail = f" ({row['detail']})" if row.get("detail") else ""
                typer.echo(f"  rejected {row['path']}: {row['reason']}{detail}")
        typer.echo(f"wrote {result.report_path}, {result.out / 'train'}, {result.contact_sheet}")
