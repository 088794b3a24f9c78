"""`portrait edit`: change one of your results and keep the face (re-scored and gated).

Only composes the library call (portrait.flows.edit); every decision lives there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .declared import collect, declared_options


def register(app: typer.Typer) -> None:
    @app.command("edit")
    @declared_options(include=("steps", "guidance", "options"))
    def edit_cmd(
        ctx: typer.Context,
        image: Path = typer.Argument(..., help="One of your results (a PNG portrait wrote), or any photo with --identity."),
        prompt: str = typer.Option(..., "--prompt", "-p", help="What to change: background, outfit, expression, lighting."),
        reference: list[Path] = typer.Option([], "--reference", "-r", help="A picture to take something from (an outfit, a backdrop); repeatable, at most 3."),
        backend: Optional[str] = typer.Option(None, "--backend", "-b", help="klein-ref (klein presets), qwen-edit (qwen-edit presets) or kontext (flux preset); default: the preset's."),
        identity: Optional[str] = typer.Option(None, "--identity", "-i", help="Whose face to keep (default: the one the result's metadata names)."),
        n: int = typer.Option(1, "--n", "-n", min=1, help="How many edits to keep (regenerated below the gate up to the preset's budget)."),
        seed: Optional[int] = typer.Option(None, "--seed", help="First seed; edit k uses seed+k. Random when omitted (recorded)."),
        out: Path = typer.Option(..., "--out", "-o", help="Output folder (PNGs + results.json)."),
        fuse: bool = typer.Option(False, "--fuse", help="Fuse the identity's reference face into the edit (off by default: it would undo an expression edit)."),
        no_finish: bool = typer.Option(False, "--no-finish", help="Skip scoring and the gate (and upscaling)."),
        **declared,  # --steps, --guidance, --option: generated from portrait.core.request (cli/declared.py)
    ) -> None:
        """Edit IMAGE by --prompt into OUT, keeping the identity's face (checked by the gate)."""
        from portrait.flows.edit import edit

        from .cmd_generate import print_result

        overrides = collect(declared)  # e.g. --option identity_references=0 --option true_cfg=4
        finish = False if no_finish else {"fuse": fuse}
        result = edit(image, prompt=prompt, references=reference, backend=backend, identity=identity, n=n, seed=seed,
                      out=out, settings=ctx.obj, finish=finish, **overrides)
        gate = result.info.get("gate")
        if gate:
            kept = sum(r.passed_gate for r in result.results)
            print(f"kept {kept} of {len(result.results)} above the gate after {gate['evaluated']} edit(s) "
                  f"({len(gate['extra_seeds'])} regenerated); the face was re-scored in "
                  f"{', '.join(result.info.get('scoring', {}).get('spaces', {})) or 'no space'}")
        print_result(result)  # the ranked files, warnings and results.json, as generate prints them
