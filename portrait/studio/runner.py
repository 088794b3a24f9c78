"""The local runner: workers that claim items from the store and keep models warm.

One worker is one process with one executor (one ModelCache) for its whole life. It
claims items preferring the group it ran last (preset/backend/identity), so a loaded
pipeline serves every item that can use it before the next one is loaded. While an item
runs, a heartbeat thread extends its lease; if the process dies, the item goes back to
the queue (see store.py). `--workers N` starts N such processes on one store.

Ctrl-C asks every worker to stop after its current item; a second Ctrl-C aborts at once
and hands the unfinished item back to the queue.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, ClassVar, Iterable

from pydantic import Field

from portrait.core.config import Preset
from portrait.core.declare import from_preset

from .executor import Executor, Outcome, perform
from .spec import Item
from .store import RetryPolicy, Store, WorkerId

ExecutorFactory = Callable[[], Executor]


@dataclass(frozen=True)
class StudioPolicy:
    """The preset's `studio` section (the declaration: type, default, bounds)."""

    SECTION: ClassVar[str] = "studio"

    lease_seconds: Annotated[float, Field(gt=0)] = 120.0  # a worker that stops heartbeating loses its items after this
    heartbeat_seconds: Annotated[float, Field(gt=0)] = 15.0
    max_attempts: Annotated[int, Field(ge=1)] = 3  # transient errors (OOM, I/O) retry with exponential backoff
    backoff_seconds: Annotated[float, Field(ge=0)] = 5.0  # first retry delay after a transient error; doubles each time
    backoff_max_seconds: Annotated[float, Field(ge=0)] = 300.0
    poll_seconds: Annotated[float, Field(gt=0)] = 0.5  # how often an idle worker looks for work
    workers: Annotated[int, Field(ge=1)] = 1  # local worker processes; each holds its own warm models
    ray_gpus_per_worker: Annotated[float, Field(ge=0)] = 1.0  # per Ray actor, only when the Ray cluster has GPUs
    ray_cpus_per_worker: Annotated[float, Field(ge=0)] = 1.0

    @classmethod
    def from_preset(cls, preset: Preset) -> "StudioPolicy":
        return from_preset(cls, preset)

    @property
    def retry(self) -> RetryPolicy:
        return RetryPolicy(lease_seconds=self.lease_seconds, max_attempts=self.max_attempts,
                           backoff_seconds=self.backoff_seconds, backoff_max_seconds=self.backoff_max_seconds)


def settle(store: Store, worker: WorkerId, item: Item, outcome: Outcome) -> str | None:
    """Write an outcome to the store; returns the item's new state (None if the lease was lost)."""
    if outcome.ok:
        return "done" if store.complete(item.id, worker, outcome.outputs, outcome.meta) else None
    return store.fail(item.id, worker, outcome.error or "unknown error", outcome.error_kind or "error",
                      outcome.permanent)


class Heartbeat:
    """Extends the worker's leases every `every` seconds while an item runs."""

    def __init__(self, store: Store, worker: WorkerId, every: float, lease: float):
        self._store, self._worker, self._every, self._lease = store, worker, every, lease
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="studio-heartbeat", daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(self._every):
            try:
                self._store.heartbeat(self._worker, self._lease)
            except Exception:  # noqa: BLE001 - a busy store must not kill the item; the next beat retries
                continue

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class LocalWorker:
    """Claims and runs items until the jobs have nothing left to run, or `stop` is set."""

    def __init__(self, store: Store, executor: Executor, policy: StudioPolicy, jobs: Iterable[str] | None = None,
                 stop: threading.Event | Any | None = None, worker: WorkerId | None = None,
                 on_settled: Callable[[Item, str | None, Outcome], None] | None = None):
        self.store = store
        self.executor = executor
        self.policy = policy
        self.jobs = list(jobs) if jobs is not None else None
        self.stop = stop or threading.Event()
        self.worker = worker or WorkerId.current()
        self.on_settled = on_settled
        self.ran = 0

    def run(self) -> int:
        last_group: str | None = None
        while not self.stop.is_set():
            item = self.store.claim(self.worker, self.jobs, prefer_group=last_group,
                                    lease_seconds=self.policy.lease_seconds)
            if item is None:
                if self.store_finished():
                    break
                self.stop.wait(self.policy.poll_seconds)
                continue
            last_group = item.group
            self.run_one(item)
        return self.ran

    def store_finished(self) -> bool:
        counts = self.store.counts(self.jobs)
        return counts["pending"] == 0 and counts["running"] == 0

    def run_one(self, item: Item) -> None:
        settled = False
        try:
            with Heartbeat(self.store, self.worker, self.policy.heartbeat_seconds, self.policy.lease_seconds):
                outcome = perform(self.executor, item)
            state = settle(self.store, self.worker, item, outcome)
            settled = True
            self.ran += 1
            if self.on_settled:
                self.on_settled(item, state, outcome)
        finally:
            if not settled:  # interrupted (second Ctrl-C): hand it back untouched
                self.store.release(item.id, self.worker)


_STOP_SIGNAL: list[int] = []  # the signal that asked this process's runner to stop (for the exit code)


def reset_stop_signal() -> None:
    _STOP_SIGNAL.clear()


def stop_signal() -> int | None:
    """The signal (SIGINT or SIGTERM) that last asked a runner in this process to stop."""
    return _STOP_SIGNAL[-1] if _STOP_SIGNAL else None


class GracefulStop:
    """First SIGINT/SIGTERM: set `event` (stop after the current item). A second signal: abort
    (the unfinished item goes back to the queue)."""

    def __init__(self, event: threading.Event | Any, on_first: Callable[[], None] | None = None):
        self.event = event
        self.on_first = on_first
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        _STOP_SIGNAL.append(int(signum))
        if self.event.is_set():
            from portrait.core.interrupt import Terminated

            raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
        self.event.set()
        if self.on_first:
            self.on_first()

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def worker_process(store_path: str, retry: RetryPolicy, policy: StudioPolicy, jobs: list[str] | None,
                   executor_factory: ExecutorFactory, stop: Any, gpu: str | None = None) -> int:
    """Entry point of one `--workers N` process (spawned, so it builds its own models)."""
    if gpu is not None:
        # Before anything imports torch: this worker sees one GPU, as `cuda`.
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    store = Store(store_path, retry)
    with GracefulStop(stop):
        return LocalWorker(store, executor_factory(), policy, jobs, stop=stop).run()


def run_local(store: Store, executor_factory: ExecutorFactory, policy: StudioPolicy,
              jobs: Iterable[str] | None = None, workers: int = 1, stop: threading.Event | None = None,
              on_stop_requested: Callable[[], None] | None = None, gpus: list[str] | None = None) -> int:
    """Run the jobs to the end with `workers` local workers. Returns items this call ran
    (for several processes: how many of them exited cleanly). With `gpus` (device ids),
    worker i is pinned to gpus[i % len(gpus)]."""
    jobs = list(jobs) if jobs is not None else None
    if workers <= 1:
        stop = stop or threading.Event()
        with GracefulStop(stop, on_stop_requested):
            return LocalWorker(store, executor_factory(), policy, jobs, stop=stop).run()
    # spawn, not fork: torch and CUDA do not survive a fork, and each worker owns its models.
    mp = multiprocessing.get_context("spawn")
    event = mp.Event()
    procs = [mp.Process(target=worker_process, name=f"studio-worker-{i}",
                        args=(str(store.path), store.retry, policy, jobs, executor_factory, event,
                              gpus[i % len(gpus)] if gpus else None))
             for i in range(workers)]
    for proc in procs:
        proc.start()
    try:
        with GracefulStop(event, on_stop_requested):
            while any(p.is_alive() for p in procs):
                if stop is not None and stop.is_set():
                    event.set()
                for p in procs:
                    p.join(timeout=0.2)
    finally:
        event.set()
        for p in procs:
            p.join()
    return sum(1 for p in procs if p.exitcode == 0)


def visible_gpus(device: str) -> list[str]:
    """The GPU ids local workers may be spread over (none on CPU or with one explicit card)."""
    if device == "cpu" or (device.startswith("cuda:")):
        return []
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        return []
    listed = [g.strip() for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    return listed or [str(i) for i in range(torch.cuda.device_count())]


def default_store_path(home: Path) -> Path:
    return home / "jobs" / "studio.db"
