"""The `portrait` command: global options, error-to-exit-code mapping, and the subcommands.

Each subcommand lives in its own module (cli/cmd_*.py) and only composes library calls;
no pipeline logic lives here. Errors become one line on stderr and an exit code:
2 bad input, 3 missing model, 4 an output the machine refused (disk full, read-only),
130 Ctrl-C, 143 SIGTERM, 1 internal (a traceback only with --debug).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import NoReturn, Optional

import typer

from portrait.core.config import Settings
from portrait.core.errors import ENVIRONMENT_ERRNOS, Interrupted, OutputFailed, PortraitError, output_failed

from . import (cmd_batch, cmd_demo, cmd_doctor, cmd_edit, cmd_eval, cmd_generate, cmd_models, cmd_plan, cmd_prepare,
               cmd_presets, cmd_results, cmd_serve, cmd_shoot, cmd_templates, cmd_train)


def main(
    ctx: typer.Context,
    home: Optional[Path] = typer.Option(None, "--home", envvar="PORTRAIT_HOME", help="Holds models/, identities/, jobs/ (default ~/.portrait)."),
    preset: Optional[str] = typer.Option(None, "--preset", envvar="PORTRAIT_PRESET", help="Preset name: tiny (offline default), sd15, sdxl, ..."),
    device: Optional[str] = typer.Option(None, "--device", envvar="PORTRAIT_DEVICE", help="auto, cpu, cuda or cuda:N."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
    license: Optional[str] = typer.Option(None, "--license", envvar="PORTRAIT_LICENSE", help="License policy: any (default) or commercial (only models a business may use; others are refused, exit 3)."),
) -> None:
    from portrait.core.licenses import check_policy

    if not debug:
        from portrait.core.quiet import quiet_libraries

        quiet_libraries()
    ctx.obj = Settings().with_(home=home.expanduser() if home else None, preset=preset, device=device, debug=debug,
                               license=check_policy(license) if license else None)
    if ctx.invoked_subcommand in PRESET_COMMANDS:
        from portrait.preset_schema import load

        load(ctx.obj.preset)  # the whole preset file against the declarations, before any work (exit 2)


# The commands that run with the --preset: its file is checked whole before they start.
PRESET_COMMANDS = ("prepare", "train", "generate", "shoot", "eval", "plan")  # batch run and serve check it as they start


class _Stopped(Exception):
    """Carries a KeyboardInterrupt past typer, which would turn it into a bare `Exit(130)` and
    lose which signal it was (SIGTERM: 143) and the line saying what was kept."""

    def __init__(self, original: KeyboardInterrupt):
        super().__init__(str(original))
        self.original = original


def _guard(callback):
    @functools.wraps(callback)  # typer reads the signature through __wrapped__
    def guarded(*args, **kwargs):
        try:
            return callback(*args, **kwargs)
        except KeyboardInterrupt as exc:
            raise _Stopped(exc) from None

    return guarded


def _guard_commands(typer_app: typer.Typer) -> None:
    for info in typer_app.registered_commands:
        info.callback = _guard(info.callback)
    for group in typer_app.registered_groups:
        _guard_commands(group.typer_instance)


def build_app() -> typer.Typer:
    """The `portrait` app: the global options and every subcommand. Commands whose options are
    generated from a declaration (generate's, cli/declared.py) take it as it is when this runs."""
    built = typer.Typer(
        name="portrait",
        help="Identity-preserving portrait studio: prepare photos, train a face, generate portraits.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
    )
    built.callback()(main)
    for module in (cmd_prepare, cmd_train, cmd_generate, cmd_shoot, cmd_edit, cmd_plan, cmd_results, cmd_templates,
                   cmd_presets, cmd_batch, cmd_models, cmd_demo, cmd_doctor, cmd_eval, cmd_serve):
        module.register(built)
    _guard_commands(built)
    return built


app = build_app()


def run(argv: list[str] | None = None, app: typer.Typer | None = None) -> int:
    """Entry point: run the app and turn every outcome into one line and an exit code.

    typer runs with standalone_mode=False so errors reach us; it then *returns* the exit
    code of a `typer.Exit` (click's contract in that mode) instead of raising, and that
    code is ours to return. SIGTERM is turned into an interruption for the whole run, so
    `kill PID` cleans up exactly like Ctrl-C and exits 143 (Ctrl-C: 130).
    """
    from portrait.core.interrupt import sigterm_raises

    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        with sigterm_raises():
            returned = (app if app is not None else globals()["app"])(args=argv, standalone_mode=False)
        code = returned if isinstance(returned, int) else 0
        if code == 130:  # typer's own Exit(130): Ctrl-C while it parsed the arguments
            print("interrupted: stopped by Ctrl-C", file=sys.stderr)
        return code
    except _Stopped as stopped:
        return _interrupted(stopped.original)
    except PortraitError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except typer.Exit as exc:
        return getattr(exc, "exit_code", 0) or 0
    except typer.Abort:  # click's answer to Ctrl-C inside a prompt
        return _interrupted(KeyboardInterrupt())
    except typer.TyperException as exc:  # typer's (vendored click) usage errors: bad option, missing argument
        print(f"error: {usage_line(exc)}", file=sys.stderr)
        return getattr(exc, "exit_code", 2) or 2
    except KeyboardInterrupt as exc:  # outside click's main (before or after the command ran)
        return _interrupted(exc)
    except OSError as exc:
        if debug:
            raise
        if exc.errno in ENVIRONMENT_ERRNOS:  # a write the machine refused, wherever it happened
            where = exc.filename or "output"
            print(f"error: {output_failed(where, exc)}", file=sys.stderr)
            return OutputFailed.exit_code
        print(f"internal error: {exc.__class__.__name__}: {exc} (rerun with --debug for details)", file=sys.stderr)
        return 1
    except Exception as exc:  # an internal error: one line unless --debug
        if debug:
            raise
        print(f"internal error: {exc.__class__.__name__}: {exc} (rerun with --debug for details)", file=sys.stderr)
        return 1


def _interrupted(exc: BaseException | None) -> int:
    """One line and 130 (SIGINT) or 143 (SIGTERM); the flows' Interrupted says what was kept."""
    from portrait.core.interrupt import signal_of

    if isinstance(exc, Interrupted):
        print(f"interrupted: {exc}", file=sys.stderr)
        return exc.exit_code
    code = 128 + (signal_of(exc) if isinstance(exc, KeyboardInterrupt) else 2)
    print("interrupted: stopped by Ctrl-C" if code == 130 else "interrupted: stopped by SIGTERM", file=sys.stderr)
    return code


def usage_line(exc: Exception) -> str:
    """click's usage error as one line (click prints usage, a hint and the error on three)."""
    message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
    # typer checks a Literal option through pydantic, whose reason starts "Value error, "
    message = message.replace("Value error, ", "")
    ctx = getattr(exc, "ctx", None)
    where = f" (see `{ctx.command_path} --help`)" if ctx is not None and getattr(ctx, "command_path", None) else ""
    return " ".join(message.split()) + where


def entry() -> None:
    leave(run())


def leave(code: int) -> NoReturn:
    """End the process with `code`, skipping the interpreter's own teardown once torch is loaded.

    With torch, diffusers and transformers imported, Python's exit (module cleanup, collecting
    every reference cycle, freeing the models) took 4.9 s against 0.4 s with os._exit, measured
    here: most of the "seconds after the last step" of a training run (bench/train_speed.py).
    Everything that must happen still does: the atexit handlers run (logging's shutdown, the
    weakref finalizers of temporary folders, multiprocessing), stdout and stderr are flushed, and
    every output of ours was already written atomically and closed. A process with other
    non-daemon threads still running exits the ordinary way, which waits for them.
    """
    import threading

    others = [t for t in threading.enumerate() if t is not threading.main_thread() and t.is_alive() and not t.daemon]
    if "torch" not in sys.modules or others:
        sys.exit(code)
    import atexit
    import os

    atexit._run_exitfuncs()  # CPython's own exit step for atexit handlers (documented in the atexit module)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    entry()
