"""Worker processes of `portrait serve`: they take items from the studio store for as long as
the server runs, each keeping its models warm (one FlowExecutor per process, as `batch run
--workers N`), and write where a running item is (phase, step / total) into the store for
the progress bars.

Cancelling a running item (DELETE /v1/jobs/{id}) goes through the progress reports: the store
answers each progress write with the item's cancel flag, and `ProgressRecorder` raises
`ItemCancelled` (a KeyboardInterrupt) there, at the item's next step. The flows unwind as for
Ctrl-C (the generate flow discards its staging folder; training keeps nothing here: the worker
removes its checkpoints), and the worker settles the item as cancelled, not re-queued.

Processes, not threads: training and generation hold the GIL for long stretches of Python,
and the HTTP server must stay responsive while they run. Each worker dies with the server
(Linux PR_SET_PDEATHSIG, and a parent check between items elsewhere), so a `kill -9` of the
server leaves no orphan running an item: the store sees the worker's process gone and
re-queues its item when the server starts again.
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from portrait.core.config import Settings
from portrait.studio.executor import FlowExecutor, perform
from portrait.studio.runner import GracefulStop, Heartbeat, LocalWorker, StudioPolicy, settle
from portrait.studio.spec import Item
from portrait.studio.store import RetryPolicy, Store, WorkerId

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux; elsewhere a no-op)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


class ItemCancelled(KeyboardInterrupt):
    """The running item was cancelled (raised from its progress report, so at its next step).
    A KeyboardInterrupt, so every flow's interrupt handling cleans up as for Ctrl-C."""


class ProgressRecorder:
    """Writes a running item's progress to the store, at most every `every` seconds (and always
    when the phase changes), so a 1000-step training does not write 1000 rows."""

    def __init__(self, store: Store, every: float):
        self.store, self.every = store, every
        self._last: dict[str, tuple[float, str]] = {}
        self._steps: dict[str, tuple[float, float]] = {}

    def __call__(self, item: Item, phase: str, done: float, total: float) -> None:
        if phase == "step":  # training steps; validation between checkpoints keeps the bar where it was
            self._steps[item.id] = (done, total)
        now = time.monotonic()
        last = self._last.get(item.id)
        if last and last[1] == phase and now - last[0] < self.every and done < total:
            return
        self._last[item.id] = (now, phase)
        step, steps = self._steps.get(item.id, (0, 0))
        try:
            cancelled = self.store.set_progress(item.id, {"phase": phase, "done": done, "total": total, "step": step,
                                                          "steps": steps})
        except Exception:  # noqa: BLE001 - a busy store must not fail the item; the next report retries
            self._last.pop(item.id, None)
            return
        if cancelled:
            raise ItemCancelled(f"{item.label}: cancelled")


class ServiceWorker(LocalWorker):
    """A LocalWorker that never runs out of work: idle, it waits for a wake-up or the poll."""

    def __init__(self, *args: Any, wake: Any = None, parent: int | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.wake = wake
        self.parent = parent

    def parent_alive(self) -> bool:
        return self.parent is None or os.getppid() == self.parent

    def run(self) -> int:
        last_group: str | None = None
        while not self.stop.is_set() and self.parent_alive():
            item = self.store.claim(self.worker, None, prefer_group=last_group, lease_seconds=self.policy.lease_seconds)
            if item is None:
                if self.wake is not None:
                    if self.wake.wait(self.policy.poll_seconds):
                        self.wake.clear()
                else:
                    self.stop.wait(self.policy.poll_seconds)
                continue
            last_group = item.group
            self.run_one(item)
        return self.ran

    def run_one(self, item: Item) -> None:
        """LocalWorker.run_one, and a cancelled item settles as cancelled (not handed back)."""
        settled = False
        try:
            with Heartbeat(self.store, self.worker, self.policy.heartbeat_seconds, self.policy.lease_seconds):
                outcome = perform(self.executor, item)
            if outcome.ok and item.kind == "generate" and self.store.cancel_requested(item.id):
                # It finished as it was cancelled: what was asked is that it leave nothing.
                for output in outcome.outputs:
                    Path(output).unlink(missing_ok=True)
                self.store.settle_cancelled(item.id, self.worker)
            else:
                settle(self.store, self.worker, item, outcome)
            settled = True
            self.ran += 1
        except KeyboardInterrupt:
            if not self.store.cancel_requested(item.id):
                raise  # a stop of the worker: the item goes back to the queue (finally)
            discard_cancelled(self.executor.settings, item)
            settled = self.store.settle_cancelled(item.id, self.worker)
            self.ran += 1
        finally:
            if not settled:
                self.store.release(item.id, self.worker)


def discard_cancelled(settings: Settings, item: Item) -> None:
    """What a cancelled item leaves: a training's checkpoints and staging (kept to resume after a
    crash, not after a cancel). A generation's staging went with the flow's own cleanup."""
    if item.kind != "train":
        return
    import shutil

    from portrait.core.lock import identity_lock

    name = item.payload["name"]
    folder = settings.identities_dir
    with identity_lock(folder, name, wait=True):
        for suffix in ("work", "staging"):
            shutil.rmtree(folder / f".{name}.{suffix}", ignore_errors=True)


def worker_main(settings: Settings, store_path: str, retry: RetryPolicy, policy: StudioPolicy, progress_every: float,
                stop: Any, wake: Any, parent: int, threads: int | None, gpu: str | None = None) -> int:
    """Entry point of one worker process (spawned: it builds its own models)."""
    die_with_parent()
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    if os.getppid() != parent:  # the server died while this process was starting
        return 1
    if threads:
        import torch

        torch.set_num_threads(threads)
    store = Store(store_path, retry)
    executor = FlowExecutor(settings, progress=ProgressRecorder(store, progress_every))
    worker = ServiceWorker(store, executor, policy, None, stop=stop, worker=WorkerId.current("serve"), wake=wake,
                           parent=parent)
    with GracefulStop(stop):
        return worker.run()


class WorkerPool:
    """N worker processes on one store, started and stopped with the server."""

    def __init__(self, settings: Settings, store: Store, policy: StudioPolicy, count: int, progress_every: float,
                 threads: int | None = None):
        import multiprocessing

        from portrait.studio.runner import visible_gpus

        self.mp = multiprocessing.get_context("spawn")  # torch and CUDA do not survive a fork
        self.stop_event = self.mp.Event()
        self.wake_event = self.mp.Event()
        gpus = visible_gpus(settings.device) if count > 1 else []
        self.procs = [self.mp.Process(
            target=worker_main, name=f"portrait-serve-worker-{i}", daemon=True,
            args=(settings, str(store.path), store.retry, policy, progress_every, self.stop_event, self.wake_event,
                  os.getpid(), threads, gpus[i % len(gpus)] if gpus else None))
            for i in range(count)]

    def start(self) -> "WorkerPool":
        for proc in self.procs:
            proc.start()
        return self

    def wake(self) -> None:
        self.wake_event.set()

    def alive(self) -> int:
        return sum(1 for p in self.procs if p.is_alive())

    def stop(self, grace: float = 10.0) -> None:
        """Ask the workers to stop after their current item; kill what is still busy after `grace`
        seconds (its item goes back to the queue and runs again on the next start)."""
        self.stop_event.set()
        self.wake_event.set()
        deadline = time.monotonic() + grace
        for proc in self.procs:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
                proc.join()


class RayLoop:
    """`--ray ADDRESS`: a driver thread that hands whatever is pending to Ray actors (the studio's
    Ray runner), then waits for more. Progress is per item (actors do not write to the store)."""

    def __init__(self, settings: Settings, store: Store, policy: StudioPolicy, address: str, workers: int):
        from functools import partial

        self.store, self.policy, self.address, self.workers = store, policy, address, workers
        self.factory = partial(FlowExecutor, settings)
        self.stop_event = threading.Event()
        self.wake_event = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="portrait-serve-ray", daemon=True)

    def start(self) -> "RayLoop":
        self.thread.start()
        return self

    def wake(self) -> None:
        self.wake_event.set()

    def alive(self) -> int:
        return self.workers if self.thread.is_alive() else 0

    def _loop(self) -> None:
        from portrait.studio.ray_runner import run_ray

        while not self.stop_event.is_set():
            if self.store.counts()["pending"]:
                run_ray(self.store, self.factory, self.policy, None, address=self.address, workers=self.workers,
                        stop=self.stop_event)
            if self.wake_event.wait(self.policy.poll_seconds):
                self.wake_event.clear()

    def stop(self, grace: float = 10.0) -> None:
        self.stop_event.set()
        self.wake_event.set()
        self.thread.join(timeout=grace)
