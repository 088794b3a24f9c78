"""`portrait doctor`: versions, devices, which models are present, and their licenses."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("doctor")
    def doctor(ctx: typer.Context) -> None:
        """Show versions, devices, models present and their licenses."""
        from rich.table import Table

        from portrait.doctor import environment_report, model_rows

        from .tables import show

        settings = ctx.obj
        env = Table(title="environment", show_header=False)
        for key, value in environment_report().items():
            env.add_row(key, str(value))
        show(env)
        models = Table(title=f"models (home: {settings.home})")
        for column in ("id", "kind", "present", "license"):
            models.add_column(column)
        for row in model_rows(settings):
            style = "yellow" if "non-commercial" in row["license"] else None
            models.add_row(row["id"], row["kind"], row["present"], row["license"], style=style)
        show(models)
