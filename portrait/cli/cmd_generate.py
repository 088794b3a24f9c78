"""`portrait generate`: render portraits of a trained (or prepared) identity.

Only composes the library call (portrait.flows.generate); every decision lives there. The
generate settings (--size, --steps, --guidance, --scheduler, --fast, --option, ...) are not
written here: they are generated from their declaration (portrait.core.request, cli/declared.py).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterator, Optional

import typer
from typer.core import TyperCommand

from .declared import collect, declared_options


def backend_help() -> tuple[str, str]:
    """The --backend help and the per-backend lines, from the backend table (in its order)."""
    from portrait.stages.backends import BACKENDS

    names = ", ".join(BACKENDS.names())
    lines = "\n\n".join(f"{s.name} ({', '.join(s.families)}{'; --fast: ' + ', '.join(s.fast) if s.fast else ''}): "
                        f"{s.help}. Options: {', '.join(s.option_names()) or 'none'}" for s in BACKENDS.specs())
    return f"One of {names} (default: the preset's; see Backends below).", f"Backends:\n\n{lines}"


class _GenerateCommand(TyperCommand):
    """Fills the --backend help and the backend list from the backend table when help is shown
    (reading the table imports every backend module, about a second, which running another
    command need not pay)."""

    def format_help(self, ctx, formatter):
        option, self.epilog = backend_help()
        for param in self.params:
            if param.name == "backend":
                param.help = option
        return super().format_help(ctx, formatter)


def register(app: typer.Typer) -> None:
    @app.command("generate", cls=_GenerateCommand)
    @declared_options
    def generate_cmd(
        ctx: typer.Context,
        identity: str = typer.Option(..., "--identity", "-i", help="Identity name (HOME/identities/NAME)."),
        template: Optional[str] = typer.Option(None, "--template", "-t", help="Style or photo template name, a .yaml, or a photo template folder."),
        prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Prompt instead of a template ({trigger} and {class} are filled in)."),
        backend: Optional[str] = typer.Option(None, "--backend", "-b", help="Generation backend (see the table in `portrait generate --help`)."),
        n: Optional[int] = typer.Option(None, "--n", "-n", min=1, help="How many images (default: the preset's; at most its generate.max_n)."),
        seed: Optional[int] = typer.Option(None, "--seed", help="First seed; image k uses seed+k. Random when omitted (recorded)."),
        out: Path = typer.Option(..., "--out", "-o", help="Output folder (PNGs + results.json)."),
        no_finish: bool = typer.Option(False, "--no-finish", help="Skip fusion / retouch / upscale / scoring and the gate."),
        no_fuse: bool = typer.Option(False, "--no-fuse", help="Skip the final face fusion."),
        no_retouch: bool = typer.Option(False, "--no-retouch", help="Skip skin retouch."),
        no_upscale: bool = typer.Option(False, "--no-upscale", help="Skip super-resolution."),
        restore: Optional[bool] = typer.Option(None, "--restore/--no-restore", help="Face restoration (GFPGAN; off in the shipped presets). When the restorer cannot run, one line says why."),
        upscale_factor: Optional[float] = typer.Option(None, "--upscale-factor", help="Final upscale factor (preset key finish.upscale.outscale)."),
        keep: Optional[int] = typer.Option(None, "--keep", min=1, help="Make K portraits that pass every check (a face, alike in the independent space, no copy of a photo, sharp, well exposed), generating more until K are kept or the attempt budget is spent; instead of --n."),
        attempts: Optional[int] = typer.Option(None, "--attempts", min=1, help="With --keep: the most candidates to try (default K x the preset's score.keep_attempts)."),
        also: list[str] = typer.Option([], "--with-identity", help="Another identity in the picture (repeatable): a group photo template assigns faces left to right; the faceid backend gives each identity its own region (IP-Adapter masks)."),
        **declared,  # --size, --steps, --guidance, ... generated from portrait.core.request (cli/declared.py)
    ) -> None:
        """Generate portraits of IDENTITY from a template or a prompt into OUT."""
        from portrait.flows.generate import generate

        overrides = collect(declared)
        finish = finish_switches(no_finish, no_fuse=no_fuse, no_retouch=no_retouch, no_upscale=no_upscale,
                                 restore=restore)
        with progress_bar(n or 1) as progress:
            result = generate(identity, template=template, prompt=prompt, backend=backend, n=n, seed=seed, out=out,
                              settings=ctx.obj, progress=progress, finish=finish, with_identity=list(also),
                              keep=keep, attempts=attempts, upscale_factor=upscale_factor, **overrides)
        print_result(result)


@contextlib.contextmanager
def progress_bar(total: float) -> Iterator[Callable[[str, float, float], None]]:
    """A transient bar on stderr while a flow runs; yields the flow's `progress(what, done, total)`."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed:.0f}/{task.total:.0f}"),
                  TimeElapsedColumn(), console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("loading models", total=total)
        yield lambda what, done, total: bar.update(task, description=what, completed=done, total=total)


def finish_switches(no_finish: bool, *, no_fuse: bool = False, no_retouch: bool = False, no_upscale: bool = False,
                    restore: bool | None = None) -> bool | dict:
    """The finish switches the flags ask for (None: the preset's and template's choice)."""
    if no_finish:
        return False
    return {"fuse": False if no_fuse else None, "retouch": False if no_retouch else None,
            "upscale": False if no_upscale else None, "restore": restore}


def print_result(result, indent: str = "") -> None:
    """The ranked files, the keep report and the warnings of one generate result."""
    import sys

    for r in result.results:
        sim = "" if r.score.similarity is None else f"  similarity {r.score.similarity:.3f}"
        gate = "" if r.passed_gate else "  (below gate)"
        print(f"{indent}{r.rank:>3}  {r.path}  seed {r.candidate.seed}{sim}{gate}")
    keep = result.info.get("keep")
    if keep:
        print(f"{indent}{keep['summary']}")
    for warning in result.info.get("warnings") or ():
        print(f"warning: {warning}", file=sys.stderr)
    print(f"{indent}wrote {len(result.results)} image(s) and {result.out / 'results.json'}")
