"""Packaging: the wheel installs only `portrait` at the top level and ships presets and templates."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(ROOT)],
        check=True, capture_output=True, timeout=600,
    )
    (found,) = out.glob("portrait-*.whl")
    return found


def test_wheel_layout(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"portrait"}
    for required in ("portrait/stages/__init__.py", "portrait/cli/main.py", "portrait/presets/models.yaml",
                     "portrait/presets/tiny.yaml", "portrait/presets/configs/sd15/model_index.json",
                     "portrait/service/app.py", "portrait/service/static/index.html", "portrait/service/static/app.js"):
        assert required in names, required
    assert any(n.startswith("portrait/templates/styles/") and n.endswith(".yaml") for n in names)


def test_wheel_imports_and_finds_its_data(wheel, tmp_path):
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(tmp_path)
    code = (
        "import portrait, portrait.stages, portrait.cli.main;"
        "from importlib import resources;"
        "assert (resources.files('portrait.presets') / 'models.yaml').is_file();"
        "assert any(resources.files('portrait.templates').iterdir());"
        "print(portrait.__file__)"
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith(str(tmp_path))


def test_one_opencv_distribution_owns_cv2():
    """insightface pulls the GUI build of OpenCV; the Makefile reinstalls the headless one last."""
    import hashlib
    import base64

    import cv2

    loaded = Path(cv2.__file__).parent
    dist = importlib.metadata.distribution("opencv-python-headless")
    binaries = [f for f in dist.files if f.name.startswith("cv2") and f.name.endswith(".so") and f.hash]
    assert binaries, "opencv-python-headless ships no cv2 binary?"
    for f in binaries:
        path = Path(dist.locate_file(f))
        assert path.parent == loaded
        digest = base64.urlsafe_b64encode(hashlib.sha256(path.read_bytes()).digest()).rstrip(b"=").decode()
        assert digest == f.hash.value, f"{path.name} is not the headless build's file"
