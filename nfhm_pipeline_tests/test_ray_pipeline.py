"""The ray engine through Dagster: NFHM_ENGINE=ray's `ray_cluster` resource (dagster-ray's LocalRay,
a local Ray of 2 CPUs) puts the demo's image embeddings on Ray Data actors; the vectors equal the
local engine's to 1e-6 and the kNN metrics are identical."""
from __future__ import annotations

import dagster as dg
import numpy as np
import pandas as pd
import pytest

pytest.importorskip("ray", reason="ray is not installed (the ray extra: pip install 'nfhm-pipeline[ray]')")
pytest.importorskip("dagster_ray", reason="dagster-ray is not installed (the ray extra)")

from conftest import local_resources  # noqa: E402

from nfhm_pipeline.catalog import load_catalog  # noqa: E402
from nfhm_pipeline.definitions import build_definitions  # noqa: E402
from nfhm_pipeline.resources import default_resources, ray_cluster_resource  # noqa: E402
from nfhm_pipeline.store import warehouse  # noqa: E402
from nfhm_pipeline.store.embedding_store import EmbeddingStore  # noqa: E402

DATASET = "demo_shapes"
MODELS = ("raw-pixels", "tiny-clip")


@pytest.fixture(scope="module")
def ray_run(tmp_path_factory):
    import ray

    data = tmp_path_factory.mktemp("ray-data")
    resources = {**local_resources(data), "ray_cluster": ray_cluster_resource(num_cpus=2)}
    defs = build_definitions(load_catalog("demo"), resources)
    results = {}
    try:
        with dg.instance_for_test() as instance:
            for key in (["image_manifest"], ["splits"]):
                dg.materialize([defs.get_assets_def(dg.AssetKey([DATASET, *key]))], instance=instance,
                               resources=resources)
            for model in MODELS:
                for stage in ("image_embeddings", "knn_metrics"):
                    assets = [defs.get_assets_def(dg.AssetKey([DATASET, stage]))]
                    result = dg.materialize(assets, instance=instance, resources=resources, partition_key=model)
                    assert result.success
                    results[(model, stage)] = result
    finally:
        if ray.is_initialized():
            ray.shutdown()
    yield data, results


def test_the_ray_engine_is_selected_by_the_ray_cluster_resource(ray_run):
    _, results = ray_run
    meta = results[("tiny-clip", "image_embeddings")].asset_materializations_for_node(
        f"{DATASET}__image_embeddings")[0].metadata
    assert meta["device"].value == "ray:cpu" and meta["new"].value > 0


def test_ray_vectors_equal_the_local_engines_and_the_metrics_are_identical(ray_run, demo_run):
    ray_data, _ = ray_run
    local_data = demo_run[0]
    manifest = pd.read_parquet(local_data / "manifests" / f"{DATASET}.parquet")
    order = manifest["image_id"].tolist()
    for model in MODELS:
        on_ray = EmbeddingStore(ray_data / "lake").read(DATASET, model, order=order)
        local = EmbeddingStore(local_data / "lake").read(DATASET, model, order=order)
        assert on_ray.image_ids.tolist() == local.image_ids.tolist() == order  # every image once
        assert on_ray.fingerprint == local.fingerprint
        np.testing.assert_allclose(on_ray.vectors, local.vectors, rtol=0, atol=1e-6)

    def knn(data):
        rows = warehouse.read_table(data / "warehouse.duckdb", "metrics", dataset=DATASET)
        rows = rows[(rows["task"] == "knn") & rows["model"].isin(MODELS)]
        return rows[["model", "level", "grp", "metric", "value"]].sort_values(
            ["model", "level", "grp", "metric"]).reset_index(drop=True)

    pd.testing.assert_frame_equal(knn(ray_data), knn(local_data))


def test_nfhm_engine_ray_adds_the_ray_cluster_resource(monkeypatch):
    monkeypatch.setenv("NFHM_ENGINE", "ray")
    monkeypatch.setenv("NFHM_RAY_ACTORS", "2")
    resources = default_resources()
    assert type(resources["ray_cluster"]).__name__ == "LocalRay"
    assert resources["torch_device"].ray_actors == 2
    monkeypatch.setenv("NFHM_ENGINE", "spark")
    from nfhm_pipeline.errors import SettingsError

    with pytest.raises(SettingsError, match="NFHM_ENGINE='spark' is not one of local, ray"):
        default_resources()
