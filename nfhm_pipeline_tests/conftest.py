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


def local_resources(data_dir: Path) -> dict:
    from nfhm_pipeline.resources import NfhmStorage, TorchDevice

    return {"storage": NfhmStorage(data_dir=str(data_dir)),
            "torch_device": TorchDevice(device="cpu", batch_size=64, num_workers=0)}


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """The demo catalog materialized once per test session through a real Dagster instance.

    Yields (data_dir, CatalogRun, instance). Slow (the whole demo), so shared.
    """
    import dagster as dg

    from nfhm_pipeline.catalog import load_catalog
    from nfhm_pipeline.runner import materialize_catalog

    data_dir = tmp_path_factory.mktemp("demo-data")
    with dg.instance_for_test() as instance:
        outcome = materialize_catalog(load_catalog("demo"), instance=instance, resources=local_resources(data_dir),
                                      log=lambda *_: None)
        yield data_dir, outcome, instance
