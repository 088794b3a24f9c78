"""`portrait serve` (the HTTP API and web UI) and `portrait serve token create | list | revoke`."""

from __future__ import annotations

from typing import Optional

import typer

serve_app = typer.Typer(help="The studio service: HTTP API (/v1, docs at /docs) and web UI on one port.",
                        invoke_without_command=True)
token_app = typer.Typer(help="Access tokens: each names a tenant; only its SHA-256 is stored.", no_args_is_help=True)
serve_app.add_typer(token_app, name="token")


def register(app: typer.Typer) -> None:
    app.add_typer(serve_app, name="serve")


@serve_app.callback()
def serve(
    ctx: typer.Context,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; a non-loopback one needs tokens."),
    port: int = typer.Option(7860, "--port", min=1, max=65535, help="TCP port for the API and the UI."),
    workers: int = typer.Option(1, "--workers", min=1, max=64, help="Worker processes taking jobs from the store."),
    ray: Optional[str] = typer.Option(None, "--ray", help="Run jobs on Ray instead: `local`, `auto` or ray://HOST:PORT."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Torch threads per worker (default: cores / workers)."),
) -> None:
    """Start the server: prints its URL, runs until Ctrl-C."""
    if ctx.invoked_subcommand is not None:
        return
    try:
        import fastapi  # noqa: F401
        import multipart  # noqa: F401  (python-multipart, for uploads)
        import uvicorn  # noqa: F401
    except ImportError as exc:
        from portrait.core.errors import BadInput

        raise BadInput(f"portrait serve needs the serve extra ({exc.name} is missing): "
                       "pip install 'portrait[serve]'") from None
    from portrait.service.server import ServeOptions, serve as run_server

    run_server(ctx.obj, ServeOptions(host=host, port=port, workers=workers, ray=ray, threads=threads))


def _db(ctx: typer.Context):
    from portrait.service.tenants import TenantDB

    return TenantDB(ctx.find_root().obj.home / "service" / "service.db")


@token_app.command("create")
def token_create(ctx: typer.Context, name: str = typer.Argument(..., help="The tenant (created when new).")) -> None:
    """Print a new access token for tenant NAME (shown once; store it safely)."""
    tenant, token = _db(ctx).create_token(name)
    typer.echo(token)
    typer.echo(f"token for tenant '{tenant.name}' created; send it as `Authorization: Bearer TOKEN`", err=True)


@token_app.command("list")
def token_list(ctx: typer.Context) -> None:
    """Tenants and how many tokens each has (tokens themselves are not stored)."""
    for row in _db(ctx).tenants():
        typer.echo(f"{row['name']}\t{row['tokens']} token(s)")


@token_app.command("revoke")
def token_revoke(ctx: typer.Context, name: str = typer.Argument(..., help="The tenant whose tokens to revoke.")) -> None:
    """Revoke every token of tenant NAME (its data stays)."""
    count = _db(ctx).revoke_tokens(name)
    typer.echo(f"{count} token(s) of '{name}' revoked")
