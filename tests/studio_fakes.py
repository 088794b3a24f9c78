"""A stand-in executor for the studio's queue tests (store, leases, crashes, workers).

It does what a real executor does at the seam (writes an image into the staging folder)
and logs each start and end with its pid, so tests can count executions per item.
Identities named `bad*` fail with a BadInput, `flaky*` fail transiently a few times.
Imported by tests and by the worker processes they start (spawn or a subprocess).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

from portrait.core.errors import bad_file
from portrait.core.io import write_image
from portrait.studio.executor import ItemResult


def log_line(path: str, text: str) -> None:
    # O_APPEND writes of one short line are atomic across processes.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (text + "\n").encode())
    finally:
        os.close(fd)


class FakeExecutor:
    def __init__(self, log: str, sleep: float = 0.0, flaky_failures: int = 2, rendezvous: int = 0):
        self.log = log
        self.sleep = sleep
        self.flaky_failures = flaky_failures
        self.rendezvous = rendezvous  # wait on the first item until this many workers have one
        self.met = False

    def meet(self) -> None:
        """Hold the first item until `rendezvous` workers each hold one (so all take part)."""
        folder = Path(self.log + ".workers")
        folder.mkdir(exist_ok=True)
        (folder / str(os.getpid())).touch()
        deadline = time.monotonic() + 120
        while len(list(folder.iterdir())) < self.rendezvous and time.monotonic() < deadline:
            time.sleep(0.02)
        self.met = True

    def run(self, item, staging: Path) -> ItemResult:
        log_line(self.log, f"start {item.id} {os.getpid()}")
        if self.rendezvous and not self.met:
            self.meet()
        time.sleep(self.sleep)
        identity = item.payload.get("identity", "")
        if identity.startswith("bad"):
            raise bad_file(f"photos/{identity}", "no_face")
        if identity.startswith("flaky"):
            starts = sum(1 for line in Path(self.log).read_text().splitlines() if line.startswith(f"start {item.id}"))
            if starts <= self.flaky_failures:
                raise OSError(f"disk busy (attempt {starts})")
        seed = int(item.payload.get("seed", 0))
        image = np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8)
        out = write_image(staging / "000.png", image, {"item": item.id})
        log_line(self.log, f"end {item.id} {os.getpid()}")
        return ItemResult(staged=(out,), meta={"seed": seed})


def starts(log: Path) -> list[tuple[str, int]]:
    if not log.exists():
        return []
    rows = [line.split() for line in log.read_text().splitlines()]
    return [(r[1], int(r[2])) for r in rows if r[0] == "start"]


def run_worker(store: str, spec: str, log: str, sleep: float, lease: float, home: str) -> None:
    """A batch run in its own process (the SIGKILL test kills and restarts this)."""
    from functools import partial

    from portrait.core.config import Settings
    from portrait.studio.api import Studio
    from portrait.studio.runner import StudioPolicy

    studio = Studio(store, settings=Settings(home=Path(home), preset="tiny", device="cpu"),
                    policy=StudioPolicy(lease_seconds=lease, heartbeat_seconds=lease / 4, poll_seconds=0.05,
                                        backoff_seconds=0.05),
                    executor_factory=partial(FakeExecutor, log, sleep))
    studio.run(spec)


if __name__ == "__main__":
    run_worker(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), float(sys.argv[5]), sys.argv[6])
