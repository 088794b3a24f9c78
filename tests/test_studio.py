"""Batch studio: spec expansion, the durable store, crash recovery, workers, the CLI.

Queue semantics run through a stand-in executor (tests/studio_fakes.py) so they are fast
and can be killed at will; the real flows on the tiny preset are tested at the end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from functools import partial
from pathlib import Path

import pytest
import yaml

from portrait.core.config import Settings
from portrait.core.errors import BadInput
from portrait.studio.api import Studio
from portrait.studio.runner import StudioPolicy
from portrait.studio.spec import expand, load_spec
from portrait.studio.store import Store, WorkerId, process_alive

sys.path.insert(0, str(Path(__file__).parent))
from studio_fakes import FakeExecutor, starts  # noqa: E402

FAST = StudioPolicy(lease_seconds=60, heartbeat_seconds=5, poll_seconds=0.05, backoff_seconds=0.05,
                    backoff_max_seconds=0.2)


def write_spec(folder: Path, **overrides) -> Path:
    spec = {"output": "out", "identities": [{"name": "alice"}, {"name": "bob"}],
            "templates": ["business", "film", "outdoor"], "backends": ["lora"], "count": 2, "seed": 5}
    spec.update(overrides)
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def fake_studio(tmp_path: Path, log: Path, sleep: float = 0.0, policy: StudioPolicy = FAST) -> Studio:
    settings = Settings(home=tmp_path / "home", preset="tiny", device="cpu")
    return Studio(tmp_path / "store.db", settings=settings, policy=policy,
                  executor_factory=partial(FakeExecutor, str(log), sleep))


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".staging" in p.name or p.name.endswith(".tmp") or p.name.startswith(".")]


# --- spec ---------------------------------------------------------------------------


def test_spec_expands_to_stable_items(tmp_path):
    path = write_spec(tmp_path, prompts=["studio portrait of {trigger} {class}"])
    spec = load_spec(path)
    job = expand(spec, base_dir=tmp_path, default_preset="tiny", identity_exists=lambda n: True)
    # 2 identities x (3 templates + 1 prompt) x 1 backend x 2 images
    assert len(job.items) == 16
    assert len({i.id for i in job.items}) == 16
    again = expand(load_spec(path), base_dir=tmp_path, default_preset="tiny", identity_exists=lambda n: True)
    assert [i.id for i in again.items] == [i.id for i in job.items] and again.id == job.id
    first = job.items[0].payload
    assert first["dest"] == str(tmp_path / "out" / "alice" / "business") and first["seed"] == 5
    assert {i.payload["seed"] for i in job.items} == {5, 6}
    assert any(i.payload["dest"].endswith("prompt-studio-portrait-of-trigger-class") for i in job.items)


def test_spec_trains_missing_identities_first(tmp_path):
    (tmp_path / "photos" / "bob").mkdir(parents=True)
    path = write_spec(tmp_path, identities=["alice", {"name": "bob", "photos": "photos/bob"}])
    job = expand(load_spec(path), base_dir=tmp_path, default_preset="tiny", identity_exists=lambda n: False)
    train = [i for i in job.items if i.kind == "train"]
    assert len(train) == 1 and train[0].payload["photos"] == [str(tmp_path / "photos" / "bob")]
    assert train[0].payload["zero_shot"] is False
    bobs = [i for i in job.items if i.kind == "generate" and i.payload["identity"] == "bob"]
    assert bobs and all(i.depends_on == train[0].id for i in bobs)
    # Once bob exists, the same spec has no train item but the same generate ids.
    trained = expand(load_spec(path), base_dir=tmp_path, default_preset="tiny", identity_exists=lambda n: True)
    assert not [i for i in trained.items if i.kind == "train"]
    assert {i.id for i in trained.items} == {i.id for i in job.items if i.kind == "generate"}


def test_zero_shot_backends_only_prepare_the_identity(tmp_path):
    def train_item(**change):
        path = write_spec(tmp_path, identities=[{"name": "bob", "photos": "photos/bob", **change.pop("ident", {})}],
                          **change)
        job = expand(load_spec(path), base_dir=tmp_path, default_preset="tiny", identity_exists=lambda n: False)
        return next(i for i in job.items if i.kind == "train")

    assert train_item(backends=["faceid", "instantid"]).payload["zero_shot"] is True
    assert train_item(backends=["faceid", "lora"]).payload["zero_shot"] is False
    assert train_item(backends=["faceid"], ident={"zero_shot": False}).payload["zero_shot"] is False


@pytest.mark.parametrize("change, reason", [
    ({"templates": [], "prompts": []}, "templates"),
    ({"backends": ["dreambooth"]}, "unknown backend dreambooth"),
    ({"count": 0}, "count"),
    ({"identities": [{"name": "a b"}]}, "identity name"),
    ({"identities": ["x", "x"]}, "identity listed twice"),
    ({"colour": "red"}, "colour"),
])
def test_bad_spec_is_one_line_naming_the_file(tmp_path, change, reason):
    path = write_spec(tmp_path, **change)
    with pytest.raises(BadInput) as err:
        load_spec(path)
    assert str(err.value).startswith(str(path)) and reason in str(err.value) and "\n" not in str(err.value)


# --- store --------------------------------------------------------------------------


def test_resubmitting_adds_nothing(tmp_path):
    studio = fake_studio(tmp_path, tmp_path / "log")
    spec = write_spec(tmp_path)
    first = studio.submit(spec)
    assert (first.added, first.total) == (12, 12)
    second = studio.submit(spec)
    assert second.added == 0 and second.job == first.job
    assert studio.status().total == 12
    # A second spec asking for some of the same images shares them.
    other = write_spec(tmp_path, templates=["business", "cyberpunk"])
    third = studio.submit(other)
    assert (third.added, third.total) == (4, 8)
    assert studio.status().total == 16


def test_store_is_wal(tmp_path):
    import sqlite3

    Store(tmp_path / "s.db")
    con = sqlite3.connect(tmp_path / "s.db")
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()


def test_racing_claims_never_hand_out_an_item_twice(tmp_path):
    studio = fake_studio(tmp_path, tmp_path / "log")
    studio.submit(write_spec(tmp_path, count=5))  # 30 items
    store = Store(studio.store.path)
    claimed: list[str] = []
    lock = threading.Lock()

    def grab():
        me = WorkerId.current()
        while (item := store.claim(me)) is not None:
            with lock:
                claimed.append(item.id)

    threads = [threading.Thread(target=grab) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(claimed) == 30 and len(set(claimed)) == 30
    assert studio.status().counts["running"] == 30


def test_spec_runs_to_completion_with_outputs_in_place(tmp_path):
    log = tmp_path / "log"
    summary = fake_studio(tmp_path, log).run(write_spec(tmp_path))
    assert summary.ok and summary.status.counts["done"] == 12
    pngs = sorted((tmp_path / "out").rglob("*.png"))
    assert len(pngs) == 12
    assert {p.relative_to(tmp_path / "out").parts[:2] for p in pngs} == {
        (who, t) for who in ("alice", "bob") for t in ("business", "film", "outdoor")}
    assert sorted(p.name for p in (tmp_path / "out" / "bob" / "film").iterdir()) == ["lora-s5.png", "lora-s6.png"]
    for row in summary.status.items:
        assert row.attempts == 1 and len(row.outputs) == 1 and Path(row.outputs[0]).is_file()
    assert leftovers(tmp_path / "out") == []
    # Running again does nothing: every item is done.
    again = fake_studio(tmp_path, log).run(write_spec(tmp_path))
    assert again.submission.added == 0 and len(starts(log)) == 12


def test_items_are_grouped_to_keep_pipelines_warm(tmp_path):
    log = tmp_path / "log"
    spec = write_spec(tmp_path, backends=["lora", "template"], count=1)
    studio = fake_studio(tmp_path, log)
    studio.run(spec)
    by_id = {r.item.id: r.item.group for r in studio.status().items}
    order = [by_id[item_id] for item_id, _ in starts(log)]
    # Each group (preset/backend/identity) runs as one block: 4 groups, 3 switches.
    switches = sum(1 for a, b in zip(order, order[1:]) if a != b)
    assert len(set(order)) == 4 and switches == 3


def test_bad_item_fails_with_reason_while_others_finish(tmp_path):
    spec = write_spec(tmp_path, identities=["alice", "bad-carol", "bob"])
    summary = fake_studio(tmp_path, tmp_path / "log").run(spec)
    failed = summary.status.failed()
    assert len(failed) == 6 and summary.status.counts["done"] == 12
    for row in failed:
        assert row.attempts == 1  # permanent: no retries
        assert row.error == "photos/bad-carol: no_face" and row.error_kind == "bad_input"
    assert len(list((tmp_path / "out").rglob("*.png"))) == 12
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["alice", "bob"]  # no empty folders


def test_transient_errors_retry_with_backoff(tmp_path):
    spec = write_spec(tmp_path, identities=["flaky-dan"], templates=["business"], count=1)
    summary = fake_studio(tmp_path, tmp_path / "log").run(spec)
    (row,) = summary.status.items
    assert row.state == "done" and row.attempts == 3  # two OSErrors, then success
    # With only 2 attempts allowed, the same item fails and keeps the last reason.
    tmp2 = tmp_path / "again"
    tmp2.mkdir()
    spec2 = write_spec(tmp2, identities=["flaky-eve"], templates=["business"], count=1)
    strict = StudioPolicy(**{**FAST.__dict__, "max_attempts": 2})
    summary = fake_studio(tmp2, tmp2 / "log", policy=strict).run(spec2)
    (row,) = summary.status.items
    assert row.state == "failed" and row.attempts == 2 and "disk busy (attempt 2)" in row.error
    # retry-failed puts it back; the third start succeeds.
    studio = fake_studio(tmp2, tmp2 / "log", policy=strict)
    assert studio.retry_failed() == 1
    assert studio.run().status.counts["done"] == 1


def test_dead_workers_items_are_requeued_at_once_on_the_same_host(tmp_path):
    studio = fake_studio(tmp_path, tmp_path / "log", policy=StudioPolicy(lease_seconds=3600))
    studio.submit(write_spec(tmp_path, count=1))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    ghost = WorkerId(f"{WorkerId.current().host}:{gone.pid}:dead", WorkerId.current().host, gone.pid, "")
    item = studio.store.claim(ghost)
    assert not process_alive(gone.pid) and item is not None
    me = WorkerId.current()
    nxt = studio.store.claim(me)  # its claim first re-queues the ghost's item
    rows = {r.item.id: r for r in studio.status().items}
    assert rows[item.id].state in ("pending", "running") and "process is gone" in rows[item.id].error
    # A live worker on another host keeps its item until the lease expires.
    far = WorkerId("elsewhere:1:x", "elsewhere", 1, "")
    held = studio.store.claim(far, lease_seconds=3600)
    studio.store.claim(me)
    assert {r.item.id: r for r in studio.status().items}[held.id].worker == far.id
    expired = studio.store.claim(far, lease_seconds=-1)
    studio.store.claim(me)
    assert {r.item.id: r for r in studio.status().items}[expired.id].worker != far.id
    assert nxt is not None


def test_sigkilled_worker_restarted_finishes_every_item_exactly_once(tmp_path):
    spec = write_spec(tmp_path)
    store, log, home = tmp_path / "store.db", tmp_path / "log", tmp_path / "home"
    # A lease of an hour: only the dead-pid check can bring the item back in time.
    cmd = [sys.executable, str(Path(__file__).parent / "studio_fakes.py"), str(store), str(spec), str(log), "0.3",
           "3600", str(home)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(cmd, env=env)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if store.exists():
                counts = Store(store).counts()
                if counts["done"] >= 3 and counts["running"] == 1:
                    break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    killed = Store(store).status()
    assert killed.counts["running"] == 1 and 3 <= killed.counts["done"] < 12
    victim = next(r for r in killed.items if r.state == "running")

    subprocess.run(cmd, env=env, check=True, timeout=300)
    final = Store(store).status()
    assert final.counts == {"pending": 0, "running": 0, "done": 12, "failed": 0}
    outputs = [o for r in final.items for o in r.outputs]
    assert len(outputs) == len(set(outputs)) == 12 and all(Path(o).is_file() for o in outputs)
    assert len(list((tmp_path / "out").rglob("*.png"))) == 12
    assert leftovers(tmp_path / "out") == []
    started = Counter(item_id for item_id, _ in starts(log))
    # The victim may have been killed between its claim and its first log line.
    assert started[victim.item.id] in (1, 2) and {n for i, n in started.items() if i != victim.item.id} == {1}
    assert set(started) == {r.item.id for r in final.items}
    assert {r.item.id: r for r in final.items}[victim.item.id].attempts == 2


def test_ctrl_c_stops_after_the_current_item(tmp_path):
    spec = write_spec(tmp_path)
    store, log = tmp_path / "store.db", tmp_path / "log"
    cmd = [sys.executable, str(Path(__file__).parent / "studio_fakes.py"), str(store), str(spec), str(log), "0.3",
           "3600", str(tmp_path / "home")]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if store.exists():
                counts = Store(store).counts()
                if counts["done"] >= 2 and counts["running"] == 1:
                    break
            time.sleep(0.05)
        in_flight = {r.item.id for r in Store(store).status().items if r.state == "running"}
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    after = Store(store).status()
    rows = {r.item.id: r for r in after.items}
    assert after.counts["running"] == 0 and after.counts["pending"] > 0
    assert all(rows[i].state == "done" for i in in_flight)  # the current item was finished, not dropped
    ends = [line.split()[1] for line in log.read_text().splitlines() if line.startswith("end")]
    assert sorted(ends) == sorted(i for i, _ in starts(log))  # nothing was cut off mid-item


def test_two_local_workers_never_run_an_item_twice(tmp_path):
    log = tmp_path / "log"
    settings = Settings(home=tmp_path / "home", preset="tiny", device="cpu")
    studio = Studio(tmp_path / "store.db", settings=settings, policy=FAST,
                    executor_factory=partial(FakeExecutor, str(log), 0.05, rendezvous=2))
    summary = studio.run(write_spec(tmp_path), workers=2)
    assert summary.status.counts["done"] == 12
    started = starts(log)
    assert len(started) == 12 and len({i for i, _ in started}) == 12
    assert len({pid for _, pid in started}) == 2 and os.getpid() not in {pid for _, pid in started}
    assert len(list((tmp_path / "out").rglob("*.png"))) == 12


def test_stop_after_current_item_then_resume(tmp_path):
    log = tmp_path / "log"
    stop = threading.Event()
    studio = fake_studio(tmp_path, log, sleep=0.05)
    spec = write_spec(tmp_path)

    def stop_after_two() -> None:
        # Stop once two items are done (a 0.3 s timer could fire before the first one on a
        # loaded machine, and then nothing was done).
        while not stop.is_set():
            if log.exists() and sum(line.startswith("end") for line in log.read_text().splitlines()) >= 2:
                stop.set()
            time.sleep(0.01)

    watcher = threading.Thread(target=stop_after_two, daemon=True)
    watcher.start()
    first = studio.run(spec, stop=stop)
    stop.set()
    watcher.join()
    assert first.stopped and 0 < first.status.counts["done"] < 12 and first.status.counts["running"] == 0
    second = fake_studio(tmp_path, log).run(spec)
    assert second.ok and len(starts(log)) == 12


# --- CLI ----------------------------------------------------------------------------


def cli(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PORTRAIT_HOME": str(home), "PORTRAIT_PRESET": "tiny",
           "PORTRAIT_DEVICE": "cpu"}
    return subprocess.run([sys.executable, "-m", "portrait.cli.main", *args], capture_output=True, text=True,
                          env=env, timeout=600)


def test_cli_status_and_bad_spec(tmp_path):
    studio = fake_studio(tmp_path, tmp_path / "log")
    studio.run(write_spec(tmp_path, identities=["alice", "bad-zed"], templates=["business"], count=1))
    out = cli("batch", "status", "--store", str(studio.store.path), "--json", home=tmp_path / "home")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["counts"] == {"pending": 0, "running": 0, "done": 1, "failed": 1}
    assert {i["state"]: i["error"] for i in data["items"]}["failed"] == "photos/bad-zed: no_face"
    table = cli("batch", "status", "--store", str(studio.store.path), home=tmp_path / "home")
    assert table.returncode == 0 and "1 done, 1 failed" in table.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("output: out\nidentities: [alice]\n")
    run = cli("batch", "run", str(bad), "--store", str(tmp_path / "s2.db"), home=tmp_path / "home")
    assert run.returncode == 2 and run.stderr.strip().count("\n") == 0 and str(bad) in run.stderr
    retry = cli("batch", "retry-failed", "--store", str(studio.store.path), home=tmp_path / "home")
    assert retry.returncode == 0 and "1 failed items re-queued" in retry.stdout
    assert studio.status().counts["pending"] == 1


# --- the real flows on the tiny preset ------------------------------------------------


@pytest.fixture()
def studio_home(tiny_home, tmp_path, astronaut, hopper):
    """A private HOME sharing the session's tiny models, with two trained-style identities."""
    from _generate_helpers import write_tiny_identity

    settings = Settings(home=tmp_path / "home", preset="tiny", device="cpu")
    settings.home.mkdir()
    (settings.home / "models").symlink_to(tiny_home.models_dir, target_is_directory=True)
    write_tiny_identity(settings, "alice", astronaut[:256, 128:384], seed=1)
    write_tiny_identity(settings, "bob", hopper[100:400, 100:400], seed=2)
    return settings


@pytest.mark.slow
def test_real_flows_run_a_spec_warm_on_the_tiny_preset(studio_home, tmp_path):
    from portrait.core.io import read_png_text
    from portrait.studio.executor import FlowExecutor

    executor = FlowExecutor(studio_home)
    studio = Studio(tmp_path / "store.db", settings=studio_home, policy=FAST, executor_factory=lambda: executor)
    # Few steps at 64 px: the queue is under test here, not image quality.
    quick = {"finish": False, "steps": 2, "size": [64, 64]}
    spec = write_spec(tmp_path, templates=["business", "film", "outdoor", "no-such-style"], **quick)
    summary = studio.run(spec)
    counts = summary.status.counts
    assert counts == {"pending": 0, "running": 0, "done": 12, "failed": 4}
    for row in summary.status.failed():
        assert row.attempts == 1 and row.error_kind == "bad_input" and "no-such-style" in row.error
    pngs = sorted((tmp_path / "out").rglob("*.png"))
    assert len(pngs) == 12 and leftovers(tmp_path / "out") == []
    chunk = json.loads(read_png_text(tmp_path / "out" / "bob" / "film" / "lora-s6.png")["portrait"])["request"]
    assert chunk["identity"] == "bob" and chunk["seed"] == 6 and chunk["template"] == "film"
    done = [r for r in summary.status.items if r.state == "done"]
    assert all(r.meta["backend"] == "lora" and r.meta["results"][0]["seed"] == r.item.payload["seed"] for r in done)
    # Warm: the pipeline was built once for all 12 items (another identity or template
    # only swaps the LoRA / scheduler), so a later item loads nothing new.
    loads = executor.cache.loads
    more = studio.run(write_spec(tmp_path, identities=["bob"], templates=["business"], seed=50, count=1, **quick))
    assert more.status.counts["done"] == 1 and executor.cache.loads == loads


@pytest.mark.slow
def test_real_flows_train_a_missing_identity_first(tiny_home, tmp_path):
    from portrait.samples import write_sample_photos
    from portrait.studio.executor import FlowExecutor

    settings = Settings(home=tmp_path / "home", preset="tiny", device="cpu")
    settings.home.mkdir()
    (settings.home / "models").symlink_to(tiny_home.models_dir, target_is_directory=True)
    write_sample_photos(tmp_path / "photos" / "carol")
    spec = write_spec(tmp_path, identities=[{"name": "carol", "photos": "photos/carol", "steps": 2}],
                      templates=["business"], count=2, finish=False, steps=2, size=[64, 64])
    executor = FlowExecutor(settings)
    studio = Studio(tmp_path / "store.db", settings=settings, policy=FAST, executor_factory=lambda: executor)
    summary = studio.run(spec)
    rows = {r.item.kind: r for r in summary.status.items}
    assert summary.ok and summary.status.counts["done"] == 3, [r.error for r in summary.status.items]
    assert rows["train"].outputs == (str(settings.identities_dir / "carol"),)
    assert (settings.identities_dir / "carol" / "lora.safetensors").is_file()
    assert len(list((tmp_path / "out" / "carol" / "business").glob("*.png"))) == 2
    # The identity exists now: the same spec expands without a train item and adds nothing.
    assert studio.submit(spec).added == 0 and len(studio.expand(spec).items) == 2


def test_ray_actors_ask_for_a_gpu_only_when_the_cluster_has_one():
    from types import SimpleNamespace

    from portrait.studio.ray_runner import actor_options, default_actor_count

    def cluster(**resources):
        return SimpleNamespace(cluster_resources=lambda: resources)

    policy = StudioPolicy()
    assert actor_options(cluster(CPU=8.0), policy) == {"num_cpus": 1.0, "max_restarts": 0}
    assert actor_options(cluster(CPU=8.0, GPU=2.0), policy)["num_gpus"] == 1.0
    assert default_actor_count(cluster(CPU=8.0, GPU=2.0), policy) == 2
    assert default_actor_count(cluster(CPU=8.0), policy) == 8
    half = StudioPolicy(ray_gpus_per_worker=0.5)
    assert default_actor_count(cluster(CPU=8.0, GPU=2.0), half) == 4


@pytest.mark.slow
def test_cli_batch_run_with_two_workers_on_the_real_flows(studio_home, tmp_path):
    spec = write_spec(tmp_path, templates=["business", "film"], count=1, finish=False, steps=2, size=[64, 64])
    store = tmp_path / "cli.db"
    run = cli("batch", "run", str(spec), "--store", str(store), "--workers", "2", "--no-progress",
              home=studio_home.home)
    assert run.returncode == 0, run.stderr
    assert "4 new of 4 items; 4 done, 0 failed, 0 left" in run.stdout
    assert len(list((tmp_path / "out").rglob("*.png"))) == 4 and leftovers(tmp_path / "out") == []
    workers = {r.worker.split(":")[1] for r in Store(store).status().items}
    assert len(workers) >= 1 and str(os.getpid()) not in workers
    again = cli("batch", "run", str(spec), "--store", str(store), "--no-progress", home=studio_home.home)
    assert again.returncode == 0 and "0 new of 4 items; 4 done" in again.stdout


@pytest.mark.slow
def test_real_flows_zero_shot_identity_is_prepared_then_generated(tiny_home, tmp_path):
    from portrait.samples import write_sample_photos

    settings = Settings(home=tmp_path / "home", preset="tiny", device="cpu")
    settings.home.mkdir()
    (settings.home / "models").symlink_to(tiny_home.models_dir, target_is_directory=True)
    write_sample_photos(tmp_path / "photos" / "dora")
    spec = write_spec(tmp_path, identities=[{"name": "dora", "photos": "photos/dora"}], templates=["business"],
                      backends=["faceid"], count=1, finish=False, steps=2, size=[64, 64])
    summary = Studio(tmp_path / "store.db", settings=settings, policy=FAST).run(spec)
    assert summary.ok, [r.error for r in summary.status.items]
    manifest = json.loads((settings.identities_dir / "dora" / "manifest.json").read_text())
    assert not manifest.get("loras")  # prepared only: no LoRA was trained
    assert [p.name for p in (tmp_path / "out" / "dora" / "business").iterdir()] == ["faceid-s5.png"]


def test_batch_exit_codes_follow_the_cli_contract():
    from portrait.cli.cmd_batch import exit_code_for
    from portrait.core.errors import ModelMissing
    from portrait.studio.executor import classify

    assert exit_code_for({"bad_input"}) == 2 and exit_code_for({"bad_input", "dependency"}) == 2
    assert exit_code_for({"bad_input", "model_missing"}) == 3
    assert exit_code_for({"error", "bad_input"}) == 1 and exit_code_for({"crashed"}) == 1
    assert classify(ModelMissing("tiny-sd15")) == ("model_missing", True, str(ModelMissing("tiny-sd15")))
    assert classify(BadInput("x.jpg: no_face"))[:2] == ("bad_input", True)
    assert classify(MemoryError("CUDA out of memory"))[:2] == ("error", False)


def test_heartbeat_keeps_a_long_item_from_being_stolen(tmp_path):
    # the item runs two leases; the heartbeat must keep a thief that claims every 50 ms off it
    policy = StudioPolicy(lease_seconds=1.0, heartbeat_seconds=0.1, poll_seconds=0.05)
    studio = fake_studio(tmp_path, tmp_path / "log", sleep=2.0, policy=policy)
    spec = write_spec(tmp_path, identities=["alice"], templates=["business"], count=1)
    runner = threading.Thread(target=studio.run, args=(spec,))
    runner.start()
    thief = WorkerId("elsewhere:1:thief", "elsewhere", 1, "")
    # The thief starts once the runner holds the item: a thief that claimed the freshly queued
    # item first simply won it (1 run in 6, and once on CI), which says nothing of the heartbeat.
    while runner.is_alive() and not any(r.state == "running" for r in studio.status().items):
        time.sleep(0.01)
    stolen = []
    while runner.is_alive():
        item = studio.store.claim(thief, lease_seconds=60)
        if item is not None:
            stolen.append(item)
        time.sleep(0.05)
    runner.join()
    (row,) = studio.status().items
    assert stolen == [] and row.state == "done" and row.attempts == 1


def test_rerun_replaces_a_crashed_attempts_outputs_without_extras(tmp_path):
    from portrait.studio.executor import perform

    spec = write_spec(tmp_path, identities=["alice"], templates=["business"], count=1)
    job = fake_studio(tmp_path, tmp_path / "log").expand(spec)
    (item,) = job.items
    dest = Path(item.payload["dest"])
    dest.mkdir(parents=True)
    for name in ("lora-s5-0.png", "lora-s5-1.png", "lora-s50.png"):  # a 2-image attempt, and another item
        (dest / name).write_bytes(b"old")
    outcome = perform(FakeExecutor(str(tmp_path / "log")), item)
    assert outcome.ok and outcome.outputs == (str(dest / "lora-s5.png"),)
    assert sorted(p.name for p in dest.iterdir()) == ["lora-s5.png", "lora-s50.png"]


def _open_store(path: str, barrier) -> None:
    from portrait.studio.store import Store
    barrier.wait()
    Store(path)


def test_processes_opening_a_new_store_at_once_all_succeed(tmp_path):
    """The schema check and the added columns run under one write lock: two processes that
    opened a new store together once failed with 'duplicate column name: cancel'."""
    import multiprocessing
    ctx = multiprocessing.get_context("spawn")
    for attempt in range(12):
        path = str(tmp_path / f"store{attempt}.db")
        barrier = ctx.Barrier(6)
        procs = [ctx.Process(target=_open_store, args=(path, barrier)) for _ in range(6)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
        assert [p.exitcode for p in procs] == [0] * 6
