"""`portrait.Studio`: the batch studio in Python, with the CLI's verbs.

    studio = portrait.Studio("jobs.db")            # default: HOME/jobs/studio.db
    studio.run("spec.yaml")                        # submit (idempotent) and run to the end
    studio.status().counts                         # {"pending": 0, "running": 0, "done": 12, "failed": 0}
    studio.retry_failed(); studio.run()            # give failed items another go
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Iterable

from portrait.core.bundle import identity_dir
from portrait.core.config import Settings, load_preset

from .executor import FlowExecutor
from .runner import ExecutorFactory, StudioPolicy, default_store_path, run_local, visible_gpus
from .spec import Job, JobSpec, expand, load_spec, parse_spec
from .store import StoreStatus, Store, Submission


@dataclass(frozen=True)
class RunSummary:
    submission: Submission | None
    status: StoreStatus
    stopped: bool  # Ctrl-C (or `stop`) ended the run before the jobs finished
    signal: int | None = None  # the signal that stopped it (SIGINT / SIGTERM), when one did

    @property
    def ok(self) -> bool:
        return self.status.finished and not self.status.failed()


class Studio:
    def __init__(self, store: str | Path | None = None, *, settings: Settings | None = None, home: str | Path | None = None,
                 preset: str | None = None, device: str | None = None, policy: StudioPolicy | None = None,
                 executor_factory: ExecutorFactory | None = None):
        self.settings = (settings or Settings()).with_(home=Path(home).expanduser() if home else None, preset=preset,
                                                       device=device)
        self.policy = policy or StudioPolicy.from_preset(load_preset(self.settings.preset))
        self._store_path = Path(store) if store else default_store_path(self.settings.home)
        # partial of a class is picklable, so the same factory serves spawned workers and Ray actors.
        self.executor_factory = executor_factory or partial(FlowExecutor, self.settings)

    @functools.cached_property
    def store(self) -> Store:
        """Opened (and created) on first use, so a spec that fails validation leaves no empty store."""
        return Store(self._store_path, self.policy.retry)

    # -- verbs ------------------------------------------------------------------------

    def expand(self, spec: str | Path | dict[str, Any] | JobSpec, base_dir: str | Path | None = None) -> Job:
        """A spec (file, mapping or JobSpec) as items, without touching the store."""
        if isinstance(spec, (str, Path)):
            path = Path(spec)
            parsed, base, source = load_spec(path), path.resolve().parent, str(path)
        else:
            parsed = spec if isinstance(spec, JobSpec) else parse_spec(spec)
            base, source = Path(base_dir or Path.cwd()).resolve(), "spec"
        return expand(parsed, base_dir=base, default_preset=self.settings.preset, source=source,
                      identity_exists=self._identity_exists)

    def submit(self, spec: str | Path | dict[str, Any] | JobSpec, base_dir: str | Path | None = None) -> Submission:
        return self.store.submit(self.expand(spec, base_dir))

    def run(self, spec: str | Path | dict[str, Any] | JobSpec | None = None, *, workers: int | None = None,
            ray: str | None = None, jobs: Iterable[str] | None = None, progress: bool = False,
            stop: threading.Event | None = None, base_dir: str | Path | None = None) -> RunSummary:
        """Submit `spec` (if given; adding only new items) and run until its items are settled.
        Without a spec, runs everything in the store that is not settled."""
        job = self.expand(spec, base_dir) if spec is not None else None  # validated before the store is touched
        submission = self.store.submit(job) if job is not None else None
        job_ids = [submission.job] if submission else (list(jobs) if jobs is not None else None)
        stop = stop or threading.Event()
        from .runner import reset_stop_signal

        reset_stop_signal()
        count = workers if workers is not None else self.policy.workers
        monitor = None
        if progress:
            from .progress import StoreMonitor

            monitor = StoreMonitor(self.store, job_ids)
        notice = (lambda: monitor.note("stopping after the current item (Ctrl-C again to abort)")) if monitor else None
        if monitor:
            monitor.__enter__()
        try:
            if ray is not None:
                from .ray_runner import run_ray

                run_ray(self.store, self.executor_factory, self.policy, job_ids, address=ray,
                        workers=workers, stop=stop, on_stop_requested=notice)
            else:
                gpus = visible_gpus(self.settings.device) if count > 1 else []
                run_local(self.store, self.executor_factory, self.policy, job_ids, workers=max(1, count), stop=stop,
                          on_stop_requested=notice, gpus=gpus)
        finally:
            if monitor:
                monitor.__exit__(None, None, None)
        status = self.store.status(job_ids)
        from .runner import stop_signal

        stopped = stop.is_set() and not status.finished
        return RunSummary(submission=submission, status=status, stopped=stopped,
                          signal=stop_signal() if stopped else None)

    def status(self, job: str | None = None) -> StoreStatus:
        return self.store.status([job] if job else None)

    def retry_failed(self, job: str | None = None) -> int:
        return self.store.retry_failed([job] if job else None)

    # -- helpers ----------------------------------------------------------------------

    def _identity_exists(self, name: str) -> bool:
        return (identity_dir(self.settings, name) / "manifest.json").is_file()
