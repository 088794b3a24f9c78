"""`portrait doctor`: versions, devices, which models are present, their licenses, and the
bill of materials of the preset under the license policy in force (`--json` for tools)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("doctor")
    def doctor(ctx: typer.Context,
               as_json: bool = typer.Option(False, "--json", help="Print everything as one JSON document.")) -> None:
        """Show versions, devices, models present and their licenses, and the preset's bill of materials."""
        from rich.markup import escape
        from rich.table import Table

        from portrait.doctor import backend_paths, bill_of_materials, environment_report, model_rows

        from .tables import show

        settings = ctx.obj
        bom = bill_of_materials(settings)
        if as_json:
            import json

            print(json.dumps({"environment": environment_report(), "models": model_rows(settings),
                              "bill_of_materials": bom, "backends": backend_paths(settings)}, indent=2, default=str))
            return
        env = Table(title="environment", show_header=False)
        for key, value in environment_report().items():
            env.add_row(key, str(value))
        show(env)
        models = Table(title=f"models (home: {settings.home})")
        for column in ("id", "kind", "present", "license", "class"):
            models.add_column(column)
        for row in model_rows(settings):
            style = "yellow" if row["license_class"] != "commercial" else None
            models.add_row(row["id"], row["kind"], row["present"], row["license"], row["license_class"], style=style)
        show(models)
        paths = Table(title=f"identity backends under --license {settings.license}")
        for column in ("backend", "preset", "status", "detail"):
            paths.add_column(column, overflow="fold")
        for row in backend_paths(settings):
            style = {"available": "green", "allowed": None, "refused": "yellow"}[row["status"]]
            paths.add_row(row["backend"], row["preset"], row["status"], escape(row["detail"]), style=style)
        show(paths)
        if bom.get("error"):
            print(f"bill of materials: not available ({bom['error']})")
            return
        table = Table(title=f"bill of materials: preset {bom['preset']}, --license {bom['license_policy']}, "
                            f"face backend {bom['face_backend']}")
        for column in ("role", "model", "status", "class", "license source", "sha256"):
            table.add_column(column, overflow="fold")
        for row in bom["models"]:
            hashes = ", ".join(f"{f['name']}: {(f['sha256'] or '-')[:16]}" for f in row.get("files", [])[:3])
            if len(row.get("files", [])) > 3:
                hashes += f" (+{len(row['files']) - 3} files)"
            status = row["status"] if row["status"] == "present" else f"{row['status']}: {row.get('reason', '')}"
            table.add_row(row["role"], row["id"], status, row.get("license_class", ""), row.get("license_source", ""),
                          hashes, style=None if row["status"] == "present" else "yellow")
        show(table)
