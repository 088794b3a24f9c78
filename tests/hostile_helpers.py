"""Helpers for the hostile-input suites: run the CLI in-process, hash inputs, find leftovers,
and a small disk (a real tmpfs, or an ENOSPC write wrapper where mounting is not allowed)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import subprocess
import uuid
from pathlib import Path
from typing import Iterator

# Names a half-done write or a staging step leaves behind (portrait.core.io, flows, executor).
LEFTOVER_TAGS = (".staging", ".tmp", ".old-", ".partial", ".write-test")


def cli(capsys, home: Path, *args: str, preset: str = "tiny") -> tuple[int, str, str]:
    from portrait.cli.main import run

    capsys.readouterr()
    code = run(["--home", str(home), "--preset", preset, "--device", "cpu", *args])
    out, err = capsys.readouterr()
    return code, out, err


def error_line(err: str, *needles: str) -> str:
    """The run's one error line: exactly one `error:`/`interrupted:` line, no traceback, and it
    names every needle (the file or option and the reason)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(("error:", "interrupted:", "internal error:"))]
    assert len(lines) == 1, err
    line = lines[0]
    assert not line.startswith("internal error"), line
    for needle in needles:
        assert needle in line, (needle, line)
    return line


def hashes(*roots: Path) -> dict[str, str]:
    """sha256 of every file under each root (or of the root itself when it is a file), plus the
    folder listing, so a deleted, added or changed file shows."""
    found: dict[str, str] = {}
    for root in roots:
        root = Path(root)
        paths = [root] if root.is_file() else sorted(root.rglob("*")) if root.exists() else []
        for path in paths:
            if path.is_file() and not path.is_symlink():
                found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
            elif path.is_dir():
                found[str(path)] = "dir"
    return found


def leftovers(*roots: Path) -> list[Path]:
    out = []
    for root in roots:
        if Path(root).exists():
            out += [p for p in Path(root).rglob("*") if any(tag in p.name for tag in LEFTOVER_TAGS)]
    return out


@contextlib.contextmanager
def small_disk(folder: Path, size: str, monkeypatch) -> Iterator[Path]:
    """A folder that runs out of space after `size` bytes: a real tmpfs when mounting works
    (as root), else every finished write below it fails with ENOSPC (portrait.core.io)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0777", f"tiny-{uuid.uuid4().hex[:6]}",
                              str(folder)], capture_output=True).returncode == 0
    if not mounted:
        from portrait.core import io

        real = io.finish_file

        def full(tmp_path: Path, target: Path, size: int | None = None) -> None:
            if folder in Path(target).resolve().parents:
                raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path))
            real(tmp_path, target, size)

        monkeypatch.setattr(io, "finish_file", full)
    try:
        yield folder
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)
