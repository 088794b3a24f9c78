"""Real signals on real `portrait` processes (issue 13): Ctrl-C (SIGINT) exits 130 and SIGTERM
exits 143, each with one line saying what was kept, and nothing is published half-done.

Each test starts the two processes (one per signal) side by side and signals each at a point
the process itself makes visible on disk: a completed training checkpoint, generate's staging
folder, the first finished batch image.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from _generate_helpers import write_tiny_identity  # noqa: E402
from hostile_helpers import error_line, hashes, leftovers  # noqa: E402

pytestmark = pytest.mark.slow
SIGNALS = {"int": signal.SIGINT, "term": signal.SIGTERM}
WAIT = 600  # seconds; a loaded CI machine is slow, the sign always comes


@pytest.fixture(scope="module")
def home(tmp_path_factory, tiny_home, astronaut):
    """A home of its own whose models are the session's tiny ones."""
    from portrait.core.config import Settings

    settings = Settings(home=tmp_path_factory.mktemp("signal-home"), preset="tiny", device="cpu")
    (settings.home / "models").symlink_to(tiny_home.models_dir)
    write_tiny_identity(settings, "sig-eve", astronaut[80:336, 120:376])
    return settings


def default_sigint() -> None:
    """Run in the child before exec: a suite started from a background job (`make test &`)
    ignores SIGINT, the child would inherit SIG_IGN and Python keeps an ignored SIGINT ignored
    (it installs its KeyboardInterrupt handler only over the default), so Ctrl-C would do nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(home, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PORTRAIT_TEST_THREADS": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "portrait.cli.main", "--home", str(home.home), "--preset", "tiny",
                             "--device", "cpu", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, stdin=subprocess.DEVNULL, preexec_fn=default_sigint)


def signal_when(procs: dict, ready) -> dict[str, tuple[int, str]]:
    """Send each process its signal as soon as `ready(key)` holds; return (exit code, stderr)."""
    pending = dict(procs)
    deadline = time.monotonic() + WAIT
    while pending and time.monotonic() < deadline:
        for key, proc in list(pending.items()):
            assert proc.poll() is None, (key, proc.communicate())  # finished before the sign: no test
            if ready(key):
                proc.send_signal(SIGNALS[key])
                del pending[key]
        time.sleep(0.05)
    assert not pending, f"no sign from {sorted(pending)} within {WAIT} s"
    results = {}
    for key, proc in procs.items():
        _, err = proc.communicate(timeout=WAIT)
        results[key] = (proc.returncode, err)
    return results


def test_train_stops_at_a_step_and_keeps_its_checkpoint(home, photos):
    from portrait.stages.train import completed_checkpoints

    before = hashes(photos)
    procs = {key: start(home, "train", str(photos), "--name", f"sig-{key}", "--steps", "60") for key in SIGNALS}
    work = {key: home.identities_dir / f".sig-{key}.work" for key in SIGNALS}
    results = signal_when(procs, lambda key: bool(work[key].is_dir() and completed_checkpoints(work[key])))
    for key, (code, err) in results.items():
        assert code == 128 + SIGNALS[key], (key, code, err)
        line = error_line(err, f"train 'sig-{key}' stopped at step", "checkpoint at step", "resume with --resume")
        kept = max(r.step for r in completed_checkpoints(work[key]))
        assert f"checkpoint at step {kept} kept" in line
        assert not (home.identities_dir / f"sig-{key}").exists()  # no bundle published
        assert not (home.identities_dir / f".sig-{key}.staging").exists()
    assert hashes(photos) == before
    assert leftovers(home.identities_dir) == []


def test_generate_publishes_nothing_when_stopped(home, tmp_path):
    outs = {key: tmp_path / f"out-{key}" for key in SIGNALS}
    procs = {key: start(home, "generate", "--identity", "sig-eve", "--template", "business", "--n", "64", "--seed", "1",
                        "--out", str(outs[key])) for key in SIGNALS}
    results = signal_when(procs, lambda key: any(tmp_path.glob(f".out-{key}.staging-*")))
    for key, (code, err) in results.items():
        assert code == 128 + SIGNALS[key], (key, code, err)
        error_line(err, "generate stopped; nothing written to", str(outs[key]))
        assert not outs[key].exists()
    assert leftovers(tmp_path) == []


def test_batch_run_stops_after_the_current_item(home, tmp_path):
    specs, stores, outputs = {}, {}, {}
    for key in SIGNALS:
        folder = tmp_path / key
        folder.mkdir()
        specs[key] = folder / "spec.yaml"
        specs[key].write_text(yaml.safe_dump({"output": "out", "identities": ["sig-eve"], "prompts": [f"{key} {{trigger}}"],
                                              "count": 6, "finish": False}))
        stores[key] = folder / "studio.db"
        outputs[key] = folder / "out"
    procs = {key: start(home, "batch", "run", str(specs[key]), "--store", str(stores[key]), "--no-progress")
             for key in SIGNALS}
    results = signal_when(procs, lambda key: any(outputs[key].rglob("*.png")))
    for key, (code, err) in results.items():
        assert code == 128 + SIGNALS[key], (key, code, err)
        line = error_line(err, "batch stopped after", "of 6 items", "run the same command again")
        images = sorted(outputs[key].rglob("*.png"))
        assert 1 <= len(images) < 6, line
        for image in images:  # each kept output is whole
            with Image.open(image) as im:
                im.load()
        assert leftovers(outputs[key]) == []
        from portrait.studio.store import Store

        counts = Store(stores[key]).counts(None)
        assert counts["done"] == len(images) and counts["running"] == 0 and counts["pending"] == 6 - len(images)
