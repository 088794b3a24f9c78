"""The stored reference figures (tests/reference_fixtures.py): small, numbers only, each one read by a check."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from reference_fixtures import FIXTURES

TESTS = Path(__file__).resolve().parent


def test_fixtures_are_small_float_arrays_each_read_by_a_check():
    files = sorted(FIXTURES.glob("*.npz"))
    assert len(files) >= 13
    assert sum(p.stat().st_size for p in files) < 2_000_000  # figures, not weights
    for path in files:
        with np.load(path, allow_pickle=False) as data:  # no pickled objects: numbers only
            assert data.files and all(data[k].dtype == np.float32 for k in data.files), path.name
    named = set()
    for test in TESTS.glob("test_*.py"):
        text = test.read_text()
        named |= set(re.findall(r'reference\(\s*f?"([a-z0-9_]+)', text))
        for prefix in re.findall(r'reference\(\s*f"([a-z0-9_]+)\{', text):
            named |= {p.stem for p in files if p.stem.startswith(prefix)}
    assert {p.stem for p in files} <= named, sorted({p.stem for p in files} - named)


def test_the_regenerating_script_names_every_file_with_a_check():
    script = (TESTS.parent / "scripts" / "reference_fixtures.py").read_text()
    readers = {t.name for t in TESTS.glob("test_*.py") if "reference(" in t.read_text() and "import" in t.read_text()
               and "reference_fixtures import" in t.read_text() and t.name != "test_reference_fixtures.py"}
    assert readers and all(f"tests/{name}" in script for name in readers), readers
