"""12 images through one warm batch runner vs 12 separate `portrait generate` processes.

Both sides are whole commands, timed from launch to exit, on the tiny preset with the
same identity, templates, seeds, steps and size (finishing off; it is its own stage):

- warm: one `portrait batch run SPEC` process: Python, torch and the pipeline load once,
  then 12 items are claimed from the store and generated;
- cold: 12 `portrait generate --n 1` processes, one per image, as a shell loop would run.

The ratio (cold / warm) is what a studio gains by keeping models warm. Target: >= 5x
(measured on the 2-core dev machine under load: warm 42.3 s, cold 401.4 s, 9.48x).
Threads are pinned to the same count on both sides so a busy machine treats them alike.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/batch_warm.py [--home DIR] [--steps 4] [--size 64]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

TEMPLATES = ("business", "film", "outdoor")
PER_TEMPLATE = 4  # 3 x 4 = 12 images
SEED = 7


def prepare_home(home: Path) -> None:
    """Tiny models (made once) and an identity bundle written the way the trainer writes one."""
    from portrait.core.config import Settings
    from portrait.core.registry import make_tiny

    settings = Settings(home=home, preset="tiny", device="cpu")
    make_tiny(settings)
    if not (settings.identities_dir / "bench" / "manifest.json").is_file():
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from _generate_helpers import write_tiny_identity
        from skimage import data

        write_tiny_identity(settings, "bench", data.astronaut()[:256, 128:384])


def portrait_cmd(home: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "portrait.cli.main", "--home", str(home), "--preset", "tiny", "--device", "cpu",
            *args]


def timed(cmd: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def warm(home: Path, work: Path, steps: int, size: int, env: dict[str, str]) -> float:
    spec = work / "spec.yaml"
    spec.write_text(yaml.safe_dump({
        "output": "warm", "identities": ["bench"], "templates": list(TEMPLATES), "count": PER_TEMPLATE,
        "seed": SEED, "steps": steps, "size": [size, size], "finish": False,
    }))
    seconds = timed(portrait_cmd(home, "batch", "run", str(spec), "--store", str(work / "studio.db"),
                                 "--no-progress"), env)
    made = len(list((work / "warm").rglob("*.png")))
    if made != len(TEMPLATES) * PER_TEMPLATE:
        raise SystemExit(f"warm run wrote {made} images, expected {len(TEMPLATES) * PER_TEMPLATE}")
    return seconds


def cold(home: Path, work: Path, steps: int, size: int, env: dict[str, str]) -> float:
    total = 0.0
    for template in TEMPLATES:
        for k in range(PER_TEMPLATE):
            total += timed(portrait_cmd(home, "generate", "--identity", "bench", "--template", template, "--n", "1",
                                        "--seed", str(SEED + k), "--steps", str(steps), "--size", f"{size}x{size}",
                                        "--no-finish", "--out", str(work / "cold" / template)), env)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, help="A HOME to reuse (tiny models are made in it if missing).")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads on both sides.")
    args = parser.parse_args()
    threads = str(args.threads)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    with tempfile.TemporaryDirectory(prefix="portrait-bench-") as tmp:
        home = args.home or Path(tmp) / "home"
        prepare_home(home)
        work = Path(tmp) / "work"
        work.mkdir()
        warm_s = warm(home, work, args.steps, args.size, env)
        print(f"warm: 1 `portrait batch run` process, 12 images: {warm_s:7.1f} s ({warm_s / 12:.2f} s/image)")
        cold_s = cold(home, work, args.steps, args.size, env)
        print(f"cold: 12 `portrait generate` processes:         {cold_s:7.1f} s ({cold_s / 12:.2f} s/image)")
        print(f"ratio cold/warm: {cold_s / warm_s:.2f}x (target >= 5x)")


if __name__ == "__main__":
    main()
