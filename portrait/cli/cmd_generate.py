"""`portrait generate`: render portraits of a trained (or prepared) identity.

Only composes the library call (portrait.flows.generate); every decision lives there. The
generate settings (--size, --steps, --guidance, --scheduler, --fast, --option, ...) are not
written here: they are generated from their declaration (portrait.core.request, cli/declared.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

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
        also: list[str] = typer.Option([], "--with-identity", help="Another identity in the picture (repeatable): a group photo template assigns faces left to right; the faceid backend gives each identity its own region (IP-Adapter masks)."),
        **declared,  # --size, --steps, --guidance, ... generated from portrait.core.request (cli/declared.py)
    ) -> None:
        """Generate portraits of IDENTITY from a template or a prompt into OUT."""
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        from portrait.flows.generate import generate

        overrides = collect(declared)
        finish = False if no_finish else {"fuse": False if no_fuse else None, "retouch": False if no_retouch else None,
                                          "upscale": False if no_upscale else None}
        console = Console(stderr=True)
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed:.0f}/{task.total:.0f}"),
                      TimeElapsedColumn(), console=console, transient=True) as bar:
            task = bar.add_task("loading models", total=n or 1)

            def progress(what: str, done: float, total: float) -> None:
                bar.update(task, description=what, completed=done, total=total)

            result = generate(identity, template=template, prompt=prompt, backend=backend, n=n, seed=seed, out=out,
                              settings=ctx.obj, progress=progress, finish=finish, with_identity=list(also),
                              **overrides)
        for r in result.results:
            sim = "" if r.score.similarity is None else f"  similarity {r.score.similarity:.3f}"
            gate = "" if r.passed_gate else "  (below gate)"
            print(f"{r.rank:>3}  {r.path}  seed {r.candidate.seed}{sim}{gate}")
        print(f"wrote {len(result.results)} image(s) and {result.out / 'results.json'}")
