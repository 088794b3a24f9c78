"""`portrait train PHOTOS... --name NAME`: prepare, train a face LoRA, write the Identity bundle."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from portrait.core.config import Settings


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train_command(
        ctx: typer.Context,
        photos: List[Path] = typer.Argument(..., help="Photo files, folders or zip archives of one person."),
        name: str = typer.Option(..., "--name", "-n", help="Identity name (HOME/identities/NAME)."),
        steps: Optional[int] = typer.Option(None, "--steps", min=1, help="The most training steps (default: preset, by photo count); the run stops earlier when held-out likeness stops improving (preset train.early_stop)."),
        rank: Optional[int] = typer.Option(None, "--rank", min=1, help="LoRA rank (default: preset)."),
        resume: bool = typer.Option(False, "--resume", help="Continue the interrupted run of this name from its last checkpoint."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing identity of this name."),
        zero_shot: bool = typer.Option(False, "--zero-shot", help="No LoRA: store reference, embeddings and report only."),
        wait: bool = typer.Option(False, "--wait", help="If another process is training this name, wait for it instead of stopping (exit 2)."),
        resolution: Optional[int] = typer.Option(None, "--resolution", help="Training size in pixels, a multiple of 8 (default: preset, 512 for SD1.5)."),
        batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Images per step (default: preset, 1)."),
        lr: Optional[float] = typer.Option(None, "--lr", help="UNet LoRA learning rate (default: preset, 1e-4; 1.0 with --optimizer prodigy)."),
        alpha: Optional[float] = typer.Option(None, "--alpha", help="LoRA alpha; the LoRA's scale is alpha / rank (default: preset)."),
        train_text_encoder: Optional[bool] = typer.Option(None, "--train-text-encoder/--no-train-text-encoder",
                                                         help="Also train a LoRA on the text encoder(s) (default: preset)."),
        optimizer: Optional[str] = typer.Option(None, "--optimizer", help="adamw | adamw8bit (needs bitsandbytes) | prodigy (default: preset, adamw)."),
        gradient_checkpointing: Optional[bool] = typer.Option(None, "--gradient-checkpointing/--no-gradient-checkpointing",
                                                             help="Trade a second forward for memory (default: on for CUDA under 16 GB, off on CPU)."),
        mixed_precision: Optional[str] = typer.Option(None, "--mixed-precision", help="auto | no | fp16 | bf16 (default: auto: fp16/bf16 on CUDA; on CPU bf16 where it has bf16 instructions, else fp32)."),
    ) -> None:
        """Find the person, train a LoRA (SD1.5/SDXL UNet, or FLUX.1 / FLUX.2 klein / Z-Image transformer), stop when held-out likeness plateaus, write the bundle."""
        from rich.console import Console

        from portrait.flows.train import train

        from .tables import show

        settings: Settings = ctx.obj or Settings()
        console = Console(stderr=True)
        with TrainProgress(console) as bar:
            identity = train(photos, name, settings=settings, steps=steps, rank=rank, resume=resume,
                             overwrite=overwrite, zero_shot=zero_shot, progress=bar.stage, on_event=bar.event,
                             wait=wait, resolution=resolution, batch_size=batch_size, lr=lr, alpha=alpha,
                             train_text_encoder=train_text_encoder, optimizer=optimizer,
                             gradient_checkpointing=gradient_checkpointing, mixed_precision=mixed_precision)
        show(summary_table(identity))


class TrainProgress:
    """A live rich display: one bar per prepare stage, and the training bar with loss and ETA."""

    def __init__(self, console):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[loss]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                 TimeRemainingColumn(), console=console, transient=False)
        self.tasks: dict[str, int] = {}

    def __enter__(self) -> "TrainProgress":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def _task(self, key: str, total: float | None) -> int:
        if key not in self.tasks:
            self.tasks[key] = self.progress.add_task(key, total=total, loss="")
        return self.tasks[key]

    def stage(self, what: str, done: float, total: float) -> None:
        self.progress.update(self._task(what, total), completed=done, total=total)

    def event(self, event) -> None:
        if event.phase == "step":
            task = self._task("train", event.total)
            self.progress.update(task, completed=event.step, total=event.total, loss=f"loss {event.loss:.4f}")
        elif event.phase == "resume":
            self.progress.update(self._task("train", event.total), completed=event.step, total=event.total)
            self.progress.console.print(f"[cyan]{event.message}")
        elif event.phase == "stop":
            self.progress.console.print(f"[cyan]stopping at step {event.step}: {event.message}")
        elif event.phase in ("validate", "class_images", "cache"):
            self.progress.update(self._task("train", event.total), description=f"train ({event.phase})")
        elif event.phase == "select":
            self.progress.update(self._task("train", event.total), description="train")
            self.progress.console.print(f"selected {event.message}")


def summary_table(identity):
    from rich.table import Table

    manifest = identity.manifest
    table = Table(title=f"identity '{identity.name}'", show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row("bundle", str(identity.root))
    table.add_row("trigger", f"{identity.trigger} {identity.class_word}")
    report = _report(identity.root)
    if report:
        table.add_row("photos", f"{report.get('kept', 0)} kept, {report.get('rejected', 0)} rejected")
        for row in report.get("photos", []):
            if row.get("status") == "rejected":
                detail = f" ({row['detail']})" if row.get("detail") else ""
                table.add_row("rejected", f"{row['path']}: {row['reason']}{detail}")
    table.add_row("face backend", str(manifest.get("face_backend", "")))
    train = manifest.get("train")
    if not identity.loras:
        table.add_row("LoRA", "none (zero-shot identity)")
    for family, lora in identity.loras.items():
        table.add_row(f"LoRA {family}", f"{lora.path.name} + {lora.kohya_path.name if lora.kohya_path else '-'} "
                                        f"(rank {lora.rank}, alpha {lora.alpha:g}, base {lora.base_model})")
    if train:
        steps = f"{train['steps']}"
        if train.get("stopped_early"):
            steps += f" of {train.get('max_steps')} (stopped: {train.get('stop_reason')})"
        table.add_row("steps", steps + (f" (resumed at {train['resumed_from']})" if train.get("resumed_from") else ""))
        table.add_row("loss", f"{train.get('first_loss')} -> {train.get('final_loss')}")
        precision = (train.get("params") or {}).get("precision")
        if precision:  # what --mixed-precision auto resolved to on this machine
            table.add_row("precision", "fp32" if precision == "no" else f"{precision} (LoRA weights in fp32)")
        table.add_row("selection", f"{train['selection']} of steps {', '.join(map(str, train['selected_steps']))}")
    rows = manifest.get("validation", [])
    for row in rows:
        mark = " *" if row.get("selected") else ""
        clip = f", CLIP-T {row['clip_t']:.3f}" if row.get("clip_t") is not None else ""
        if row.get("keeps_prompt") is False:
            clip += " (lost the prompt: not selectable)"
        loss = f", loss {row['loss']:.4f}" if row.get("loss") is not None else " (base model)"
        table.add_row(f"checkpoint {row['step']}", f"likeness {row['score']:.3f}{clip}{loss}{mark}")
    if len(rows) > 1:  # the curve as a small plot: one character per validation, step 0 first
        from portrait.core.formats.curve import sparkline

        validation = (train or {}).get("validation") or {}
        space = f" ({validation.get('space')}, {validation.get('against')})" if validation.get("space") else ""
        table.add_row("likeness curve", f"{sparkline([r.get('score') for r in rows])}{space}")
        if any(r.get("clip_t") is not None for r in rows):
            table.add_row("CLIP-T curve", sparkline([r.get("clip_t") for r in rows]))
    timings = manifest.get("timings", {})
    if "total" in timings:
        table.add_row("time", f"{timings['total']:.1f} s")
    return table


def _report(root: Path) -> dict:
    import json

    try:
        return json.loads((root / "report.json").read_text())
    except (OSError, ValueError):
        return {}
