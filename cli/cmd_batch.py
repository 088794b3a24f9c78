"""`portrait batch`: placeholder until its issue lands (exits 2 saying so)."""

from __future__ import annotations

import typer

from portrait.core.errors import BadInput


def register(app: typer.Typer) -> None:
    @app.command("batch", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
    def _placeholder() -> None:
        """Not available yet in this build."""
        raise BadInput("`portrait batch` is not available yet in this build")
