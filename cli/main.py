"""The `portrait` command: global options, error-to-exit-code mapping, and the subcommands.

Each subcommand lives in its own module (cli/cmd_*.py) and only composes library calls;
no pipeline logic lives here. Errors become one line on stderr and an exit code:
2 bad input, 3 missing model, 1 internal (a traceback only with --debug).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from portrait.core.config import Settings
from portrait.core.errors import PortraitError

from . import cmd_batch, cmd_demo, cmd_doctor, cmd_generate, cmd_models, cmd_prepare, cmd_serve, cmd_templates, cmd_train

app = typer.Typer(
    name="portrait",
    help="Identity-preserving portrait studio: prepare photos, train a face, generate portraits.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def main(
    ctx: typer.Context,
    home: Optional[Path] = typer.Option(None, "--home", envvar="PORTRAIT_HOME", help="Holds models/, identities/, jobs/ (default ~/.portrait)."),
    preset: Optional[str] = typer.Option(None, "--preset", envvar="PORTRAIT_PRESET", help="Preset name: tiny (offline default), sd15, sdxl, ..."),
    device: Optional[str] = typer.Option(None, "--device", envvar="PORTRAIT_DEVICE", help="auto, cpu, cuda or cuda:N."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
) -> None:
    if not debug:
        from portrait.core.quiet import quiet_libraries

        quiet_libraries()
    ctx.obj = Settings().with_(home=home.expanduser() if home else None, preset=preset, device=device, debug=debug)


for module in (cmd_prepare, cmd_train, cmd_generate, cmd_templates, cmd_batch, cmd_models, cmd_demo, cmd_doctor,
               cmd_serve):
    module.register(app)


def run(argv: list[str] | None = None) -> int:
    """Entry point: run the app and turn every error into one line and an exit code."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        app(args=argv, standalone_mode=False)
        return 0
    except PortraitError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except typer.Exit as exc:
        return getattr(exc, "exit_code", 0) or 0
    except typer.Abort:
        print("aborted", file=sys.stderr)
        return 130
    except typer.TyperException as exc:  # typer's (vendored click) usage errors: bad option, missing argument
        exc.show()
        return getattr(exc, "exit_code", 2) or 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # an internal error: one line unless --debug
        if debug:
            raise
        print(f"internal error: {exc.__class__.__name__}: {exc} (rerun with --debug for details)", file=sys.stderr)
        return 1


def entry() -> None:
    sys.exit(run())


if __name__ == "__main__":
    entry()
