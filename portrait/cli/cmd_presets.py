"""`portrait presets list|show`: the shipped presets, and every setting a preset can hold.

`show` prints each section's settings from their declarations (portrait.core.declare: the
policy dataclass fields): key, type, default, bounds, this preset's value where it differs, and
the help the declaration carries. It checks the preset whole on the way, so a typo in a
preset file is reported here exactly as `portrait generate` would (exit 2).
"""

from __future__ import annotations

import json
from typing import Any, Optional

import typer

presets_app = typer.Typer(help="Presets: the shipped ones, and each setting with its type, default and bounds.",
                          no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(presets_app, name="presets")


@presets_app.command("list")
def list_presets(json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Every shipped preset: name, family, tiny, license, description."""
    from rich.table import Table

    from portrait.preset_schema import catalogue

    from .tables import show

    rows = catalogue()
    if json_out:
        print(json.dumps(rows, indent=2))
        return
    table = Table()
    for column in ("name", "family", "tiny", "license", "description"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["name"], row["family"], "yes" if row["tiny"] else "", row["license"] or "", row["description"])
    show(table)


@presets_app.command("show")
def show_preset(ctx: typer.Context,
                name: Optional[str] = typer.Argument(None, help="A preset name or a .yaml file (default: --preset)."),
                json_out: bool = typer.Option(False, "--json", help="Print JSON (what GET /v1/presets/{name} returns).")) -> None:
    """Each section's settings: type, default, bounds, this preset's value, help."""
    from rich.table import Table

    from portrait.preset_schema import show as schema_of

    from .tables import show

    doc = schema_of(name or ctx.obj.preset)
    if json_out:
        print(json.dumps(doc, indent=2))
        return
    print(f"preset {doc['name']} ({doc['source']}): family {doc['family']}"
          f"{', tiny stand-ins' if doc['tiny'] else ''}{', license ' + doc['license'] if doc['license'] else ''}")
    for section, rows in doc["sections"].items():
        table = Table(title=section)
        for column in ("key", "type", "default", "bounds", "value", "help"):
            table.add_column(column, overflow="fold")
        for row in _flat(rows):
            table.add_row(row["key"], row["type"], _text(row.get("default", "")), row["bounds"],
                          _text(row["value"]) if "value" in row else "", row["help"])
        show(table)


def _flat(rows: list[dict[str, Any]], prefix: str = "") -> list[dict[str, Any]]:
    """Nested sections (finish.fuse) as dotted keys."""
    out = []
    for row in rows:
        if "settings" in row:
            out += _flat(row["settings"], f"{prefix}{row['key']}.")
        else:
            out.append({**row, "key": prefix + row["key"]})
    return out


def _text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        return value
    return json.dumps(value)
