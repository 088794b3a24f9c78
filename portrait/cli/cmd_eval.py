"""`portrait eval RESULTS... [--out DIR]`: an HTML report with plots and the same figures as JSON.

Only composes the library call (portrait.flows.evaluate).
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_command(
        ctx: typer.Context,
        results: List[Path] = typer.Argument(..., help="`portrait generate` output folders (or a batch output tree, or a batch store file)."),
        out: Optional[Path] = typer.Option(None, "--out", "-o", help="Report folder (default: FIRST_RESULTS/eval)."),
        rescore: bool = typer.Option(True, "--rescore/--no-rescore", help="Score images a results.json does not list (needs the identity in HOME)."),
    ) -> None:
        """Compare runs: similarity per backend/template in every space, CLIP-T, gate, copy-paste, best/worst."""
        from portrait.flows.evaluate import evaluate

        report = evaluate(results, out, settings=ctx.obj, rescore=rescore)
        overall = report.data["overall"]
        print(f"{overall['n']} image(s), gate pass rate {overall['pass_rate']}, copy-paste {overall['copy_paste']}")
        print(f"wrote {report.html} and {report.json}")
