"""Write and check the lock files that `make demo`, `make test` and CI install from.

Why a lock: pyproject keeps ranges for people who install `portrait` into their own
environment, but a range is not a tested environment. On 2026-11-29 transformers 5.24.0
appeared, required peft >= 0.22 (which did not exist), and a fresh clone stopped working
without a line of the project changing. The lock pins every package, transitive ones
included, with hashes, for CPython 3.11 on x86_64 Linux.

    python scripts/lock.py compile   # regenerate locks/dev.lock and locks/runtime.lock (`make lock`)
    python scripts/lock.py check     # exit 1 with one line when pyproject changed since

The compile step is `uv pip compile` (pinned in the dev extra): it keeps the versions already
in the lock unless pyproject no longer allows them, so regenerating after adding one
dependency does not upgrade everything else. `--upgrade` asks for the newest allowed.

The check needs nothing but the standard library, so CI can run it before any install: each
lock's first line records the sha256 of the inputs it was compiled from (requires-python,
dependencies, optional-dependencies, the overrides file).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCKS = ROOT / "locks"
OVERRIDES = LOCKS / "overrides.txt"
GPU_OVERRIDES = LOCKS / "overrides-gpu.txt"
# (lock file, extras, extra override files) - runtime.lock is what `pip install portrait` without
# extras needs (the CPU onnxruntime); dev.lock is what `make test` installs; gpu.lock is the runtime
# of a CUDA machine (`make install-gpu`): the `gpu` extra's onnxruntime-gpu and the `flux` extra,
# with the CPU `onnxruntime` overridden away. Why an override and not extras or markers:
# insightface requires `onnxruntime` by name, so any install of portrait pulls the CPU wheel,
# and onnxruntime-gpu installed beside it overwrites the same `onnxruntime` module files (each
# uninstall then breaks the other). Only a resolver override keeps one wheel per machine.
# runtime and gpu are compiled with dev.lock as constraints, so shared packages agree.
TARGETS = (("dev.lock", ("dev",), ()), ("runtime.lock", (), ()), ("gpu.lock", ("gpu", "flux"), (GPU_OVERRIDES,)))
PYTHON = "3.11"
PLATFORM = "x86_64-manylinux_2_28"
MARK = "# portrait-lock-inputs: "


def inputs_digest() -> str:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    material = {
        "requires-python": project.get("requires-python"),
        "dependencies": project.get("dependencies", []),
        "optional-dependencies": project.get("optional-dependencies", {}),
        "overrides": OVERRIDES.read_text() if OVERRIDES.exists() else "",
        "overrides-gpu": GPU_OVERRIDES.read_text() if GPU_OVERRIDES.exists() else "",
        "python": PYTHON,
        "platform": PLATFORM,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def recorded_digest(lock: Path) -> str | None:
    if not lock.exists():
        return None
    first = lock.read_text().splitlines()[:1]
    return first[0][len(MARK):].strip() if first and first[0].startswith(MARK) else None


def check() -> int:
    want = inputs_digest()
    for name, _, _ in TARGETS:
        lock = LOCKS / name
        got = recorded_digest(lock)
        if got is None:
            print(f"error: {lock.relative_to(ROOT)} is missing or has no inputs line: run 'make lock'", file=sys.stderr)
            return 1
        if got != want:
            print(f"error: {lock.relative_to(ROOT)} is stale: pyproject.toml's dependencies (or locks/overrides.txt) "
                  f"changed since it was compiled; run 'make lock', then 'make test', and commit the lock",
                  file=sys.stderr)
            return 1
    return 0


def uv() -> str:
    here = Path(sys.executable).parent / "uv"
    found = str(here) if here.exists() else shutil.which("uv")
    if not found:
        sys.exit("error: uv is not installed: run 'make install' first (it is in the dev extra)")
    return found


def compile_locks(upgrade: bool) -> int:
    digest = inputs_digest()
    for name, extras, more in TARGETS:
        lock = LOCKS / name
        cmd = [uv(), "pip", "compile", str(ROOT / "pyproject.toml"), "--python-version", PYTHON,
               "--python-platform", PLATFORM, "--generate-hashes", "--override", str(OVERRIDES),
               "--no-header", "--quiet", "-o", str(lock)]
        for extra_override in more:
            cmd += ["--override", str(extra_override)]
        for extra in extras:
            cmd += ["--extra", extra]
        if name != "dev.lock":
            cmd += ["--constraint", str(LOCKS / "dev.lock")]
        if upgrade:
            cmd.append("--upgrade")
        env = {**os.environ, "UV_CUSTOM_COMPILE_COMMAND": "make lock"}
        result = subprocess.run(cmd, cwd=ROOT, env=env)
        if result.returncode:
            return result.returncode
        body = lock.read_text()
        if body.startswith(MARK):  # uv keeps our first line from the last compile; replace it
            body = body.split("\n", 1)[1]
        header = (f"{MARK}{digest}\n# CPython {PYTHON}, {PLATFORM}; extras: {', '.join(extras) or 'none'}.\n"
                  f"# Generated by 'make lock' (scripts/lock.py) from pyproject.toml; do not edit by hand.\n")
        body = "\n".join(line for line in body.splitlines() if not line.startswith("# CPython") and not line.startswith("# Generated by")) + "\n"
        lock.write_text(header + body)
        print(f"wrote {lock.relative_to(ROOT)}")
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["check"]:
        return check()
    if argv[:1] == ["compile"]:
        return compile_locks(upgrade="--upgrade" in argv)
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
