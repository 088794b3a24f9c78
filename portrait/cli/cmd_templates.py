"""`portrait templates list`: the style and photo templates that ship with portrait."""

from __future__ import annotations

import typer

templates_app = typer.Typer(help="Style templates (prompt + settings) and photo templates (image + YAML).",
                            no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(templates_app, name="templates")


@templates_app.command("list")
def list_templates(json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Every shipped template: name, kind, title, controls, composition."""
    import json

    from portrait.stages.templates import shipped_templates

    rows = [{"name": t.name, "kind": t.kind, "title": t.title, "composition": t.composition, "fast": t.fast,
             "controls": {c.name: c.strength for c in t.controls}, "description": t.description}
            for t in shipped_templates()]
    if json_out:
        print(json.dumps(rows, indent=2))
        return
    from rich.table import Table

    from .tables import show

    table = Table()
    for column in ("name", "kind", "title", "controls", "composition"):
        table.add_column(column)
    for row in rows:
        controls = ", ".join(f"{k} {v:g}" for k, v in row["controls"].items())
        table.add_row(row["name"], row["kind"], row["title"], controls, row["composition"])
    show(table)
