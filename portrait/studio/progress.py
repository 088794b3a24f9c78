"""Live progress for a batch, read from the store (so it shows every worker, local or Ray).

On a terminal: a rich live view with an overall bar, the counts, and a per-item table of
what is running, what failed and what finished last. Elsewhere (logs, CI): one line per
item as it settles.
"""

from __future__ import annotations

import threading
import time
from typing import Iterable

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .store import ItemRow, Store, StoreStatus

_STYLE = {"pending": "dim", "running": "cyan", "done": "green", "failed": "red"}


def status_table(rows: Iterable[ItemRow], title: str | None = None) -> Table:
    table = Table(title=title, expand=False, show_lines=False)
    for col in ("item", "state", "tries", "time", "worker", "output / error"):
        table.add_column(col, overflow="fold")
    for r in rows:
        detail = r.error or (r.outputs[0] if r.outputs else "")
        if r.state == "pending" and r.error:
            detail = f"retrying: {r.error}"
        table.add_row(r.item.label, f"[{_STYLE[r.state]}]{r.state}[/]", str(r.attempts),
                      _elapsed(r),
                      (r.worker or "").split(":")[1] if r.worker and r.state == "running" else "", detail)
    return table


def _elapsed(row: ItemRow) -> str:
    if row.seconds is not None:
        return f"{row.seconds:.1f}s"
    if row.state == "running" and row.started:
        return f"{time.time() - row.started:.0f}s…"
    return ""


def visible_rows(status: StoreStatus, limit: int = 14) -> list[ItemRow]:
    """Running and failed items first, then the most recent finishes; large batches stay readable."""
    running = [r for r in status.items if r.state == "running"]
    failed = [r for r in status.items if r.state == "failed"]
    done = sorted((r for r in status.items if r.state == "done"), key=lambda r: r.finished or 0, reverse=True)
    retrying = [r for r in status.items if r.state == "pending" and r.error]
    return (running + retrying + failed + done)[:limit]


class StoreMonitor:
    """Polls the store in a thread and renders progress until stopped."""

    def __init__(self, store: Store, jobs: Iterable[str] | None, console: Console | None = None,
                 every: float = 0.5):
        self.store = store
        self.jobs = list(jobs) if jobs is not None else None
        self.console = console or Console(stderr=True)
        self.every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="studio-progress", daemon=True)
        self._seen: dict[str, str] = {}

    def __enter__(self) -> "StoreMonitor":
        # Report what changes from now on, not what a resumed job finished earlier.
        self._seen = {r.item.id: f"{r.state}:{r.attempts}" for r in self.store.status(self.jobs).items}
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def note(self, message: str) -> None:
        self.console.print(message)

    def _loop(self) -> None:
        if self.console.is_terminal:
            self._live()
        else:
            self._lines()

    def _live(self) -> None:
        bar = Progress(TextColumn("[bold]studio"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                       TimeElapsedColumn(), console=self.console)
        task = bar.add_task("", total=None)
        with Live(console=self.console, refresh_per_second=4, transient=False) as live:
            while True:
                stopping = self._stop.is_set()
                status = self.store.status(self.jobs)
                c = status.counts
                bar.update(task, total=status.total, completed=c["done"] + c["failed"],
                           description=f"{c['running']} running, {c['pending']} pending, {c['failed']} failed")
                live.update(Group(bar, status_table(visible_rows(status))))
                if stopping:
                    break
                self._stop.wait(self.every)

    def _lines(self) -> None:
        while True:
            stopping = self._stop.is_set()
            for row in self.store.status(self.jobs).items:
                key = f"{row.state}:{row.attempts}"
                if self._seen.get(row.item.id) == key:
                    continue
                self._seen[row.item.id] = key
                if row.state == "done":
                    self.console.print(f"done    {row.item.label} ({row.seconds or 0:.1f}s) -> "
                                       f"{', '.join(row.outputs)}", soft_wrap=True, highlight=False)
                elif row.state == "failed":
                    self.console.print(f"failed  {row.item.label}: {row.error}", soft_wrap=True, highlight=False)
                elif row.state == "pending" and row.error:
                    self.console.print(f"retry   {row.item.label}: {row.error}", soft_wrap=True, highlight=False)
            if stopping:
                break
            self._stop.wait(self.every)
