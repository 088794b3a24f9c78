"""Regenerate the reference-equality fixtures (tests/fixtures/reference/*.npz) from fetched mirrors.

The reference-equality tests compare our code with the reference implementations on the same
tiny weights; the references' outputs are stored as fixtures so CI, which has no mirrors,
checks them on every run (tests/reference_fixtures.py). This script re-runs those tests with
PORTRAIT_RECORD_REFERENCE=1: each check then runs the reference from its mirror, writes what it
computed, and still compares our code against it. Run it after changing a check's weights or
inputs, or to confirm the stored figures against a fresh reference:

    python scripts/reference_fixtures.py              # every check
    python scripts/reference_fixtures.py -k pulid     # the checks pytest's -k selects

Mirrors are bare git directories at $PORTRAIT_MIRRORS/<owner>+<name>/repo (default /work/.mirror),
fetched with the project's `fetch` tool; their code is read, never committed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIRRORS = ("xinntao+facexlib", "bytedance+InfiniteYou", "ToTheBeginning+PuLID", "huggingface+diffusers",
           "instantX-research+InstantID")
# test file -> the checks in it that run a reference (pytest -k expression)
CHECKS = {
    "tests/test_arcface_irse.py": "facexlib or infiniteyou_reference",
    "tests/test_flux.py": "reference",
    "tests/test_pulid.py": "reference",
    "tests/test_pulid_flux.py": "reference",
    # one training step of ours against diffusers' train_dreambooth_lora_{flux,flux2_klein,z_image}.py
    "tests/test_train_flow_reference.py": "reference",
    # InstantID's draw_kps, Resampler and pipeline (tests/instantid_reference.py: its two shims)
    "tests/test_zero_shot.py": "instantid and reference",
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", default=None, help="only the checks this pytest -k expression selects")
    args = parser.parse_args()
    root = Path(os.environ.get("PORTRAIT_MIRRORS", "/work/.mirror"))
    missing = [name for name in MIRRORS if not (root / name / "repo" / "HEAD").exists()]
    if missing:
        print(f"missing mirrors under {root}: {', '.join(missing)} (fetch github:OWNER/NAME)", file=sys.stderr)
        return 2
    env = dict(os.environ, PORTRAIT_RECORD_REFERENCE="1", PORTRAIT_MIRRORS=str(root))
    failed = 0
    for path, selected in CHECKS.items():
        expression = f"({selected}) and ({args.k})" if args.k else selected
        command = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", path, "-k", expression]
        print("$", " ".join(command), flush=True)
        failed |= subprocess.run(command, cwd=ROOT, env=env).returncode not in (0, 5)  # 5: none selected
    written = sorted((ROOT / "tests" / "fixtures" / "reference").glob("*.npz"))
    total = sum(p.stat().st_size for p in written)
    print(f"{len(written)} fixtures, {total / 1024:.0f} KiB in tests/fixtures/reference/")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
