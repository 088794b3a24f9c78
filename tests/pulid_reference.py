"""Import ToTheBeginning/PuLID's own code for the PuLID tests (never vendored).

Only `scripts/reference_fixtures.py` (recording the stored fixtures, tests/reference_fixtures.py)
imports it: the mirror is fetched with the project's `fetch` tool, and recording without it is an
error. Its
modules import preprocessing packages that are not installed here and that the compared code
never calls (basicsr, facexlib, torchsde): empty stand-ins take those names for the import
only, and everything is removed again afterwards.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import subprocess
import sys
import types
from pathlib import Path

from reference_fixtures import mirror

STUBS = {
    "basicsr": {}, "basicsr.utils": {"img2tensor": None, "tensor2img": None},
    "facexlib": {}, "facexlib.parsing": {"init_parsing_model": None},
    "facexlib.utils": {}, "facexlib.utils.face_restoration_helper": {"FaceRestoreHelper": None},
    "torchsde": {"BrownianTree": None},
}


def checkout(target: Path) -> Path:
    """A work tree of the reference's code folders (the mirror is a bare git directory)."""
    archive = subprocess.run(["git", "--git-dir", str(mirror("ToTheBeginning+PuLID")), "archive", "HEAD", "pulid", "eva_clip", "flux"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


@contextlib.contextmanager
def reference_modules(target: Path, *names: str):
    import diffusers  # noqa: F401  (diffusers probes optional packages at import: before the stand-ins)

    root = checkout(target)
    added = []
    for name, attrs in STUBS.items():
        if name in sys.modules:
            continue
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        module.__dict__.update(attrs)
        sys.modules[name] = module
        added.append(name)
    sys.path.insert(0, str(root))
    try:
        yield types.SimpleNamespace(**{n.replace(".", "_"): importlib.import_module(n) for n in names})
    finally:
        sys.path.remove(str(root))
        for name in [n for n in sys.modules if n.split(".")[0] in ("pulid", "eva_clip", "flux")]:
            del sys.modules[name]
        for name in added:
            sys.modules.pop(name, None)
