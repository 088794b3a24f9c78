"""`portrait demo`: the whole path on bundled sample photos with the tiny preset."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo(ctx: typer.Context, out: Path = typer.Option(Path("outputs/demo"), "--out", help="Output folder.")) -> None:
        """Run train + generate on sample photos with the offline tiny preset."""
        from portrait.demo import run_demo

        for line in run_demo(ctx.obj, out):
            print(line, flush=True)
