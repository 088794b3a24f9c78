"""Shared fixtures: a tiny-model home made once per session, and real photos from packages."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_home(tmp_path_factory):
    """Settings whose HOME holds every make-tiny model (written once per test session)."""
    import torch

    from portrait.core.config import Settings
    from portrait.core.registry import make_tiny

    # Tiny models run fastest on one thread; with the cores shared, more threads made a
    # 2-step 64 px run ~10x slower (thread oversubscription), measured here.
    torch.set_num_threads(int(os.environ.get("PORTRAIT_TEST_THREADS", "1")))
    home = tmp_path_factory.mktemp("portrait-home")
    settings = Settings(home=home, preset="tiny", device="cpu")
    make_tiny(settings)
    return settings


@pytest.fixture()
def ctx(tiny_home):
    """A fresh RunContext on the tiny preset (its own ModelCache)."""
    from portrait.core.context import RunContext

    return RunContext.create(tiny_home, preset="tiny")


@pytest.fixture(scope="session")
def photos(tmp_path_factory) -> Path:
    """The demo's sample photos (six astronaut shots, Hopper, a truncated JPEG), written once per
    session; tests read them and copy them before changing anything."""
    from portrait.samples import write_sample_photos

    folder = tmp_path_factory.mktemp("sample-photos") / "photos"
    write_sample_photos(folder)
    return folder


@pytest.fixture()
def own_home(tmp_path, tiny_home):
    """A home of its own (identities are per test) sharing the session's tiny models."""
    from portrait.core.config import Settings

    root = tmp_path / "home"
    root.mkdir()
    (root / "models").symlink_to(tiny_home.models_dir, target_is_directory=True)
    return Settings(home=root, preset="tiny", device="cpu")


@pytest.fixture(scope="module")
def finish_ctx(tiny_home):
    """A RunContext on the tiny preset shared by a module's tests (warm finishing models)."""
    from portrait.core.context import RunContext

    return RunContext.create(tiny_home, preset="tiny")


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    from skimage import data

    return data.astronaut()


@pytest.fixture(scope="session")
def hopper() -> np.ndarray:
    import matplotlib.cbook
    from PIL import Image

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as fh:
        return np.asarray(Image.open(fh).convert("RGB"))


@pytest.fixture(scope="session")
def t1_group() -> np.ndarray:
    """insightface's t1.jpg: six people."""
    import insightface

    from portrait.core.formats.images import read_rgb

    return read_rgb(Path(insightface.__file__).parent / "data" / "images" / "t1.jpg")
