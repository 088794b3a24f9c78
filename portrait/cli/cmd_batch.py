"""`portrait batch run | status | retry-failed`: the durable batch studio."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from portrait.core.errors import BadInput, Interrupted, ModelMissing, PortraitError

batch_app = typer.Typer(help="Durable, resumable batches: identities x templates x counts.", no_args_is_help=True)

STORE_HELP = "The job store (SQLite). Default: HOME/jobs/studio.db."


def _existing_store(ctx: typer.Context, store: Optional[Path]) -> Path:
    """status / retry-failed read a store; they never create an empty one by accident."""
    from portrait.studio.runner import default_store_path

    path = store or default_store_path(ctx.obj.home)
    if not path.is_file():
        raise BadInput(f"{path}: no such store (run `portrait batch run SPEC` first, or pass --store)")
    return path


def _studio(ctx: typer.Context, store: Optional[Path]):
    from portrait.studio.api import Studio

    return Studio(store, settings=ctx.obj)


@batch_app.command("run")
def run(
    ctx: typer.Context,
    spec: Path = typer.Argument(..., help="Job spec (YAML or JSON); relative paths in it are relative to the file."),
    store: Optional[Path] = typer.Option(None, "--store", help=STORE_HELP),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Local worker processes (default: preset studio.workers)."),
    ray: Optional[str] = typer.Option(None, "--ray", help="Run on Ray: `local`, `auto` or ray://HOST:PORT."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Live per-item progress on stderr."),
) -> None:
    """Submit SPEC (only items not in the store yet are added) and run it to the end."""
    from portrait.core.interrupt import signal_of
    from portrait.preset_schema import load
    from portrait.studio.spec import load_spec

    load(ctx.obj.preset)  # the whole preset file against the declarations (exit 2)
    load_spec(spec)  # a bad spec is refused before the store is created
    studio = _studio(ctx, store)
    try:
        summary = studio.run(spec, workers=workers, ray=ray, progress=progress)
    except KeyboardInterrupt as exc:  # a second signal: the running item went back to the queue
        if isinstance(exc, Interrupted):
            raise
        raise Interrupted("batch aborted; the unfinished item went back to the queue and finished items are kept; "
                          "run the same command again to resume", signal_of(exc)) from None
    sub = summary.submission
    counts = summary.status.counts
    typer.echo(f"job {sub.job}: {sub.added} new of {sub.total} items; {counts['done']} done, "
               f"{counts['failed']} failed, {counts['pending'] + counts['running']} left  (store {studio.store.path})")
    if summary.stopped:
        import signal

        left = counts["pending"] + counts["running"]
        raise Interrupted(f"batch stopped after {counts['done']} of {sub.total} items ({left} left, each output "
                          f"complete or not written); run the same command again to resume",
                          summary.signal or signal.SIGINT)
    failed = summary.status.failed()
    if failed:
        for row in failed[:10]:
            typer.echo(f"failed: {row.item.label}: {row.error}", err=True)
        more = " (first 10 shown)" if len(failed) > 10 else ""
        message = f"{len(failed)} of {summary.status.total} items failed{more}; fix them and run `portrait batch retry-failed`"
        error = PortraitError(message)
        error.exit_code = exit_code_for({row.error_kind for row in failed})
        raise error


@batch_app.command("status")
def status(
    ctx: typer.Context,
    store: Optional[Path] = typer.Option(None, "--store", help=STORE_HELP),
    job: Optional[str] = typer.Option(None, "--job", help="Only this job id."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable: counts and every item."),
) -> None:
    """Counts per state and a per-item table."""
    from portrait.studio.progress import status_table

    from .tables import show

    _existing_store(ctx, store)
    studio = _studio(ctx, store)
    state = studio.status(job)
    if as_json:
        sys.stdout.write(json.dumps(state.as_dict(), indent=2, default=str) + "\n")
        return
    c = state.counts
    show(status_table(state.items, title=f"{studio.store.path}"))
    typer.echo(f"{state.total} items: {c['done']} done, {c['failed']} failed, {c['running']} running, "
               f"{c['pending']} pending")


@batch_app.command("retry-failed")
def retry_failed(
    ctx: typer.Context,
    store: Optional[Path] = typer.Option(None, "--store", help=STORE_HELP),
    job: Optional[str] = typer.Option(None, "--job", help="Only this job id."),
    run_now: bool = typer.Option(False, "--run", help="Run them right away (local, one worker)."),
) -> None:
    """Put failed items back in the queue (attempts reset); `batch run` or `--run` runs them."""
    _existing_store(ctx, store)
    studio = _studio(ctx, store)
    count = studio.retry_failed(job)
    typer.echo(f"{count} failed items re-queued")
    if run_now and count:
        summary = studio.run(jobs=[job] if job else None, progress=True)
        c = summary.status.counts
        typer.echo(f"{c['done']} done, {c['failed']} failed")


def exit_code_for(kinds: set[str | None]) -> int:
    """The CLI contract's codes for a batch: 3 if a model is missing, 2 if every failure is the
    user's input (or follows from it), else 1."""
    if "model_missing" in kinds:
        return ModelMissing.exit_code
    if kinds <= {"bad_input", "dependency"}:
        return BadInput.exit_code
    return PortraitError.exit_code


def register(app: typer.Typer) -> None:
    app.add_typer(batch_app, name="batch")
