"""The whole demo catalog materialized through a real Dagster instance, offline.

One module-scoped run (the demo datasets × both self-built models) serves several
assertions, because materializing is the slow part.
"""
from pathlib import Path

import dagster as dg
import pytest

from nfhm_pipeline.catalog import load_catalog
from nfhm_pipeline.definitions import build_definitions
from nfhm_pipeline.store import warehouse


def test_definitions_load_and_validate():
    defs = build_definitions(load_catalog("demo"))
    dg.Definitions.validate_loadable(defs)
    keys = {k.to_user_string() for a in defs.assets for k in a.keys}
    assert {"demo_shapes/image_manifest", "demo_shapes/image_embeddings", "digits/knn_metrics"} <= keys


def test_demo_catalog_materializes_without_failures(demo_run):
    _, outcome, _ = demo_run
    assert outcome.failed == {}


def test_manifest_lands_in_parquet_and_warehouse(demo_run):
    data_dir, _, _ = demo_run
    images = warehouse.read_table(data_dir / "warehouse.duckdb", "images", dataset="demo_shapes")
    assert len(images) == 216 and images["image_id"].is_unique
    assert (data_dir / "manifests" / "demo_shapes.parquet").exists()


def test_every_model_partition_has_embeddings_and_metrics(demo_run):
    data_dir, _, _ = demo_run
    m = warehouse.read_table(data_dir / "warehouse.duckdb", "metrics")
    for ds in ("demo_shapes", "digits"):
        assert set(m.loc[(m["dataset"] == ds) & (m["task"] == "knn"), "model"]) == {"raw-pixels", "tiny-clip"}


def test_raw_pixels_on_digits_reach_the_known_nearest_neighbour_accuracy(demo_run):
    data_dir, _, _ = demo_run
    value = warehouse.query(
        data_dir / "warehouse.duckdb",
        "SELECT value FROM metrics WHERE dataset='digits' AND model='raw-pixels' AND task='knn' "
        "AND level='label' AND grp='all' AND metric='top1_cosine'")["value"][0]
    assert value >= 0.95


def test_text_tower_model_gets_zero_shot_metrics_and_baseline_does_not(demo_run):
    data_dir, _, _ = demo_run
    zs = warehouse.query(data_dir / "warehouse.duckdb",
                         "SELECT DISTINCT model FROM metrics WHERE task = 'zero_shot'")
    assert set(zs["model"]) == {"tiny-clip"}


def test_checks_passed(demo_run):
    _, _, instance = demo_run
    from dagster import AssetCheckKey

    key = AssetCheckKey(dg.AssetKey(["demo_shapes", "image_manifest"]), "image_ids_unique")
    record = instance.event_log_storage.get_latest_asset_check_execution_by_key([key])[key]
    assert record.status.value == "SUCCEEDED"


def test_workspace_loads_with_the_dagster_cli():
    import subprocess
    import sys

    from conftest import REPO_ROOT

    done = subprocess.run([str(Path(sys.executable).parent / "dagster"), "definitions", "validate", "-w", "workspace.yaml"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def test_model_comparison_writes_charts_and_a_self_contained_html_report(demo_run):
    data_dir, _, _ = demo_run
    report_dir = data_dir / "reports" / "demo_shapes"
    assert (report_dir / "knn_cosine_species.png").exists()
    assert (report_dir / "confusion_species.png").exists()
    html = (report_dir / "demo_shapes_report.html").read_text(encoding="utf-8")
    assert "data:image/png;base64," in html and 'src="http' not in html


def test_embedding_maps_are_drawn_per_model_and_level(demo_run):
    data_dir, _, _ = demo_run
    maps = data_dir / "reports" / "demo_shapes" / "maps"
    # a folder per model: (model, level) pairs can never share a file name (issue 16 item 11)
    assert {str(p.relative_to(maps)) for p in maps.glob("*/*.png")} >= {
        f"{m}/umap_{lvl}.png" for m in ("raw-pixels", "tiny-clip") for lvl in ("species", "genus", "family")}


SMALL_CATALOG = """
datasets:
  shapes:
    reader: demo_shapes
    images_per_species: 2
    size: 32
    labels: [species, genus, family]
    group: taxa
models:
  raw-pixels:
    loader: raw_pixels
    image_size: 8
  bioclip:
    loader: open_clip
    model: hf-hub:imageomics/bioclip
"""


def test_missing_weights_fail_only_their_own_partition_with_a_clear_message(tmp_path, monkeypatch):
    from conftest import local_resources

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    (tmp_path / "cat.yaml").write_text(SMALL_CATALOG)
    from nfhm_pipeline.runner import materialize_catalog

    with dg.instance_for_test() as instance:
        outcome = materialize_catalog(load_catalog(tmp_path / "cat.yaml"), instance=instance,
                                      resources=local_resources(tmp_path / "data"), log=lambda *_: None)
    assert set(outcome.failed) == {"shapes/[bioclip]"}
    message = outcome.failed["shapes/[bioclip]"]
    assert "imageomics/bioclip" in message and "MissingWeightsError" in message
    assert "Traceback" not in message
    m = warehouse.read_table(tmp_path / "data" / "warehouse.duckdb", "metrics")
    assert set(m["model"]) == {"raw-pixels"}
