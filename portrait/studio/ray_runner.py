"""The Ray runner (`portrait batch run SPEC --ray ADDRESS`, extra `ray`).

Same items, same store, same guarantees as the local runner. The driver (this process)
is the only one that touches the SQLite store: it claims items under its own worker id,
keeps their leases alive, and settles outcomes. The work runs in Ray actors, each one a
warm worker holding an executor (and so its ModelCache) for its whole life; the driver
keeps each actor on the group it ran last, so pipelines stay loaded.

When the cluster has GPUs, each actor asks for `ray_gpus_per_worker` of one, so Ray
places at most one model-holding worker per GPU (or packs fractional ones). Actors and
the driver must see the same filesystem for HOME and the output folder, as on any Ray
cluster with shared storage.

If the driver dies, its items are re-run when a new driver on the same host starts (the
process is gone) or when their leases expire; if an actor dies, its item counts as a
transient failure, is retried with backoff, and the actor is replaced.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict
from typing import Any, Iterable

from portrait.core.errors import BadInput

from .executor import Outcome, perform
from .runner import ExecutorFactory, GracefulStop, StudioPolicy, settle
from .spec import Item
from .store import Store, WorkerId


class WarmWorker:
    """The body of one Ray actor: an executor built once, then one item per call."""

    def __init__(self, executor_factory: ExecutorFactory):
        self.executor = executor_factory()

    def run(self, item: dict[str, Any]) -> dict[str, Any]:
        return asdict(perform(self.executor, Item.from_dict(item)))

    def ready(self) -> bool:
        return True


def import_ray():
    try:
        import ray
    except ImportError:
        raise BadInput("--ray needs the `ray` extra: pip install 'portrait[ray]'") from None
    return ray


def connect(address: str | None):
    """`local` (or None) starts a private instance; `auto` or `ray://host:port` joins a cluster."""
    ray = import_ray()
    if ray.is_initialized():
        return ray, False
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
    if address and address != "local":
        kwargs["address"] = address
    try:
        ray.init(**kwargs)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise BadInput(f"--ray {address}: cannot connect ({exc})") from None
    return ray, True


def actor_options(ray, policy: StudioPolicy) -> dict[str, Any]:
    gpus = float(ray.cluster_resources().get("GPU", 0))
    options: dict[str, Any] = {"num_cpus": policy.ray_cpus_per_worker, "max_restarts": 0}
    if gpus > 0:
        options["num_gpus"] = policy.ray_gpus_per_worker
    return options


def default_actor_count(ray, policy: StudioPolicy) -> int:
    resources = ray.cluster_resources()
    if resources.get("GPU", 0) > 0:
        return max(1, int(resources["GPU"] / policy.ray_gpus_per_worker))
    return max(1, int(resources.get("CPU", 1) / max(policy.ray_cpus_per_worker, 1e-6)))


def run_ray(store: Store, executor_factory: ExecutorFactory, policy: StudioPolicy, jobs: Iterable[str] | None,
            address: str | None = None, workers: int | None = None, stop: threading.Event | None = None,
            on_stop_requested=None) -> int:
    """Run the jobs to the end on Ray. Returns the number of items settled by this driver."""
    ray, started = connect(address)
    jobs = list(jobs) if jobs is not None else None
    stop = stop or threading.Event()
    driver = WorkerId.current("ray")
    remote_cls = ray.remote(WarmWorker)
    options = actor_options(ray, policy)
    count = workers or default_actor_count(ray, policy)

    def new_actor():
        return remote_cls.options(**options).remote(executor_factory)

    actors = [new_actor() for _ in range(count)]
    last_group: list[str | None] = [None] * count
    inflight: dict[Any, tuple[int, Item]] = {}
    settled = 0
    next_beat = time.monotonic() + policy.heartbeat_seconds
    try:
        with GracefulStop(stop, on_stop_requested):
            while True:
                busy = {slot for slot, _ in inflight.values()}
                for slot in range(count):
                    if slot in busy or stop.is_set():
                        continue
                    item = store.claim(driver, jobs, prefer_group=last_group[slot],
                                       lease_seconds=policy.lease_seconds)
                    if item is None:
                        break
                    last_group[slot] = item.group
                    inflight[actors[slot].run.remote(item.to_dict())] = (slot, item)
                if not inflight:
                    counts = store.counts(jobs)
                    if stop.is_set() or (counts["pending"] == 0 and counts["running"] == 0):
                        break
                    time.sleep(policy.poll_seconds)
                    continue
                ready, _ = ray.wait(list(inflight), num_returns=1, timeout=policy.poll_seconds)
                if time.monotonic() >= next_beat:
                    store.heartbeat(driver, policy.lease_seconds)
                    next_beat = time.monotonic() + policy.heartbeat_seconds
                for ref in ready:
                    slot, item = inflight.pop(ref)
                    try:
                        outcome = Outcome(**ray.get(ref))
                    except Exception as exc:  # noqa: BLE001 - the actor died (node lost, OOM kill)
                        outcome = Outcome(ok=False, error=f"ray worker lost: {exc.__class__.__name__}: {exc}",
                                          error_kind="error", permanent=False)
                        ray.kill(actors[slot], no_restart=True)
                        actors[slot] = new_actor()
                        last_group[slot] = None
                    settle(store, driver, item, outcome)
                    settled += 1
    finally:
        for ref, (_, item) in inflight.items():  # aborted: give unfinished items back
            ray.cancel(ref, force=True)
            store.release(item.id, driver)
        for actor in actors:
            ray.kill(actor, no_restart=True)
        if started:
            ray.shutdown()
    return settled
