"""Shared fixtures.

`shared_data` points at ../shared/data (real images and weights that live beside
the repository on developer and CI machines, never on a user's machine); tests
that need it skip cleanly when it is absent.
"""
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("NFHM_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real-data test: {SHARED_DATA} is absent (it exists only beside the repo on CI)")
    return SHARED_DATA
