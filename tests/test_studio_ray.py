"""The Ray runner on a local Ray instance started by the test: same items, same store."""

from __future__ import annotations

import os
import sys
from functools import partial
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from portrait.core.config import Settings  # noqa: E402
from portrait.studio.api import Studio  # noqa: E402

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))
from studio_fakes import FakeExecutor, starts  # noqa: E402
from test_studio import FAST, leftovers, write_spec  # noqa: E402



@pytest.fixture(scope="module")
def local_ray():
    # Workers import the test helpers (the fake executor) by module name.
    path = os.pathsep.join([str(TESTS), *sys.path])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path, "HF_HUB_OFFLINE": "1"}})
    yield ray
    ray.shutdown()


def test_ray_runs_a_spec_with_store_semantics(local_ray, tmp_path):
    log = tmp_path / "log"
    settings = Settings(home=tmp_path / "home", preset="tiny", device="cpu")
    studio = Studio(tmp_path / "store.db", settings=settings, policy=FAST,
                    executor_factory=partial(FakeExecutor, str(log), 0.05))
    spec = write_spec(tmp_path, identities=["alice", "bad-bob", "flaky-cy"], templates=["business", "film"], count=2)
    summary = studio.run(spec, ray="local", workers=2)
    counts = summary.status.counts
    assert counts == {"pending": 0, "running": 0, "done": 8, "failed": 4}
    assert {r.error for r in summary.status.failed()} == {"photos/bad-bob: no_face"}
    flaky = [r for r in summary.status.items if r.item.payload["identity"] == "flaky-cy"]
    assert all(r.state == "done" and r.attempts == 3 for r in flaky)
    assert len(list((tmp_path / "out").rglob("*.png"))) == 8 and leftovers(tmp_path / "out") == []
    # Both actors worked, none of them is the driver, and every good item ran once.
    pids = {pid for _, pid in starts(log)}
    assert len(pids) == 2 and os.getpid() not in pids
    assert len(starts(log)) == 4 + 4 + 4 * 3  # good once, bad once (permanent), flaky three times
    assert all(r.worker and r.worker.endswith(":ray") for r in summary.status.items)
    again = studio.run(spec, ray="local", workers=2)
    assert again.submission.added == 0 and len(starts(log)) == 20


@pytest.mark.slow
def test_ray_runs_the_real_flows_on_the_tiny_preset(local_ray, tiny_home, tmp_path, astronaut):
    from _generate_helpers import write_tiny_identity

    settings = Settings(home=tmp_path / "home", preset="tiny", device="cpu")
    settings.home.mkdir()
    (settings.home / "models").symlink_to(tiny_home.models_dir, target_is_directory=True)
    write_tiny_identity(settings, "alice", astronaut[:256, 128:384], seed=1)
    studio = Studio(tmp_path / "store.db", settings=settings, policy=FAST)
    spec = write_spec(tmp_path, identities=["alice"], templates=["business"], count=2, finish=False, steps=2,
                      size=[64, 64])
    summary = studio.run(spec, ray="local", workers=1)
    assert summary.ok and summary.status.counts["done"] == 2, [r.error for r in summary.status.items]
    assert sorted(p.name for p in (tmp_path / "out" / "alice" / "business").iterdir()) == ["lora-s5.png",
                                                                                         "lora-s6.png"]
