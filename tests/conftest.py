"""Shared pytest fixtures. Other test files rely on these names; keep them stable."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data  # noqa: E402  (needs the path above)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Point the data cache at a per-session temp folder so tests never touch ~/.cache."""
    monkeypatch.setenv("SKIN_UNET_CACHE", str(tmp_path_factory.getbasetemp() / "skin-unet-cache"))


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
    """A tiny synthetic set: 24 pairs of 128x96 images in the ISIC 2018 layout (Training only,
    so find_pairs splits it by hash: 20 train, 1 val, 3 test)."""
    root = tmp_path_factory.mktemp("synthetic")
    data.write_synthetic(str(root), count=24, seed=0, size_wh=(128, 96))
    return str(root)
