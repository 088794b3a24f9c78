"""`portrait serve` (the HTTP API and web UI), `portrait serve token create | list | revoke`,
`portrait serve tenant show | set` (quotas and retention per tenant) and `portrait serve sweep`."""

from __future__ import annotations

from typing import Optional

import typer

serve_app = typer.Typer(help="The studio service: HTTP API (/v1, docs at /docs) and web UI on one port.",
                        invoke_without_command=True)
token_app = typer.Typer(help="Access tokens: each names a tenant; only its SHA-256 is stored.", no_args_is_help=True)
tenant_app = typer.Typer(help="Per-tenant quotas and retention (the keys of the preset's service.tenant section).",
                         no_args_is_help=True)
serve_app.add_typer(token_app, name="token")
serve_app.add_typer(tenant_app, name="tenant")


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
    auth: Optional[str] = typer.Option(None, "--auth", help="tokens (each request names its tenant; no tokens: nobody "
                                       "gets in) or none (one local tenant, loopback only). Default: the preset's "
                                       "service.auth, tokens."),
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

    if auth is not None and auth not in ("tokens", "none"):
        from portrait.core.errors import BadInput

        raise BadInput(f"--auth {auth}: use tokens or none")
    run_server(ctx.obj, ServeOptions(host=host, port=port, workers=workers, ray=ray, threads=threads, auth=auth))


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


@tenant_app.command("show")
def tenant_show(ctx: typer.Context, name: str = typer.Argument(..., help="The tenant (`local` for --auth none).")) -> None:
    """Print the tenant's limits and retention: each key, its value, and where it comes from."""
    import dataclasses

    from portrait.service.policy import ServicePolicy
    from portrait.preset_schema import load

    settings = ctx.find_root().obj
    db = _db(ctx)
    row = next((t for t in db.tenants() if t["name"] == name), None)
    if row is None and name != "local":
        from portrait.core.errors import BadInput

        raise BadInput(f"tenant '{name}': no such tenant (known: {', '.join(t['name'] for t in db.tenants()) or 'none'})")
    overrides = row["settings"] if row else {}
    defaults = ServicePolicy.from_preset(load(settings.preset)).tenant
    policy = defaults.with_overrides(overrides, f"tenant '{name}' settings")
    for key, value in dataclasses.asdict(policy).items():
        source = "tenant" if key in overrides else "preset"
        typer.echo(f"{key}\t{value}\t({source})")


@tenant_app.command("set")
def tenant_set(ctx: typer.Context, name: str = typer.Argument(..., help="The tenant (`local` for --auth none)."),
               values: list[str] = typer.Argument(..., help="KEY=VALUE pairs (VALUE `default` removes the override).")
               ) -> None:
    """Override the tenant's quotas or retention, e.g. `max_queued_items=100 photos_days=7`."""
    import yaml

    from portrait.core.errors import BadInput
    from portrait.preset_schema import load
    from portrait.service.policy import ServicePolicy, TenantPolicy

    settings = ctx.find_root().obj
    given: dict = {}
    for pair in values:
        key, sep, text = pair.partition("=")
        if not sep or key not in TenantPolicy.keys():
            raise BadInput(f"{pair}: give KEY=VALUE with KEY one of {', '.join(TenantPolicy.keys())}")
        given[key] = None if text == "default" else yaml.safe_load(text)
    db = _db(ctx)
    current = next((t["settings"] for t in db.tenants() if t["name"] == name), {})
    merged = {k: v for k, v in {**current, **given}.items() if v is not None}
    defaults = ServicePolicy.from_preset(load(settings.preset)).tenant
    defaults.with_overrides(merged, f"tenant '{name}'")  # checked against the declaration before it is stored
    db.set_tenant_settings(name, given)
    typer.echo(f"tenant '{name}': " + ", ".join(f"{k}={'default' if v is None else v}" for k, v in given.items()))


@serve_app.command("sweep")
def sweep(ctx: typer.Context) -> None:
    """Apply every tenant's retention now (the server also does it every service.sweep_seconds)."""
    from portrait.service.service import StudioService

    for receipt in StudioService(ctx.find_root().obj).sweep():
        typer.echo(f"{receipt['action']}\t{receipt['deleted']}\t{receipt['removed']}")
