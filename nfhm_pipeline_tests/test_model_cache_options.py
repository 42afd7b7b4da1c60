"""Per-model pixel handling (issue 14): ``cache: off`` decodes every run and keeps no pixels;
``jpeg_draft: true`` decodes large JPEGs at reduced size under its own fingerprint. Real Dagster
runs of the raw-pixel model on a tmp data dir."""
from __future__ import annotations

import dagster as dg
import numpy as np
import pytest
from PIL import Image

from conftest import local_resources
from helpers import materialize
from nfhm_pipeline.catalog import CatalogError, load_catalog
from nfhm_pipeline.definitions import build_definitions
from nfhm_pipeline.stages.base import Paths
from nfhm_pipeline.store import warehouse

MODELS = {"px": "loader: raw_pixels\nimage_size: 16", "px-nocache": "loader: raw_pixels\nimage_size: 16\ncache: off",
          "px-draft": "loader: raw_pixels\nimage_size: 16\njpeg_draft: true"}


def write_catalog(tmp_path, models: dict[str, str]):
    folder = tmp_path / "photos"
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i, species in enumerate(["oak", "ash", "elm"] * 3):
        # 320 px JPEGs of smooth colour fields: at 16 px the draft path decodes them at 1/8 scale
        base = rng.integers(0, 255, (5, 5, 3)).astype(np.uint8)
        Image.fromarray(base).resize((320, 320), Image.BICUBIC).save(folder / f"{i}.jpg", quality=92)
        rows.append(f"{i}.jpg,{species}\n")
    (folder / "labels.csv").write_text("path,species\n" + "".join(rows), encoding="utf-8")
    text = (f"datasets:\n  trees:\n    reader: label_csv\n    csv: {folder / 'labels.csv'}\n    path_column: path\n"
            "    labels: [species]\n    split: {test_fraction: 0.34, seed: 0, folds: 2}\nmodels:\n"
            + "".join(f"  {k}:\n" + "".join(f"    {line}\n" for line in v.splitlines()) for k, v in models.items()))
    path = tmp_path / "catalog.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("value, expected", [("off", False), ("on", True), ("'off'", False), ("true", True)])
def test_cache_reads_on_and_off(tmp_path, value, expected):
    catalog = load_catalog(write_catalog(tmp_path, {"px": f"loader: raw_pixels\nimage_size: 8\ncache: {value}"}))
    assert catalog.models["px"].pixel_cache is expected and catalog.models["px"].jpeg_draft is False


@pytest.mark.parametrize("entry, says", [("cache: sometimes", "'cache' must be on or off"),
                                         ("cache: 0", "'cache' must be on or off"),
                                         ("jpeg_draft: yes please", "'jpeg_draft' must be true or false")])
def test_bad_cache_settings_are_refused_at_load(tmp_path, entry, says):
    with pytest.raises(CatalogError, match=says):
        load_catalog(write_catalog(tmp_path, {"px": f"loader: raw_pixels\nimage_size: 8\n{entry}"}))


def packed_chunks(data_dir):
    return sorted((data_dir / "cache" / "pixels").rglob("*.ids"))


def test_cache_off_keeps_no_pixels_and_draft_gets_its_own_fingerprint(tmp_path):
    catalog = load_catalog(write_catalog(tmp_path, MODELS))
    data = tmp_path / "data"
    defs = build_definitions(catalog, local_resources(data))
    with dg.instance_for_test() as instance:
        assert materialize(defs, instance, "trees", ["image_manifest"]).success
        assert materialize(defs, instance, "trees", ["image_embeddings"], "px-nocache").success
        assert packed_chunks(data) == []  # decoded, embedded, not kept
        assert materialize(defs, instance, "trees", ["image_embeddings"], "px").success
        assert packed_chunks(data)
        for _ in range(2):  # the rerun of the draft model finds its table under its own fingerprint
            result = materialize(defs, instance, "trees", ["image_embeddings"], "px-draft")
            assert result.success
        loaded = [e.materialization.metadata["model_loaded"].value for e in result.get_asset_materialization_events()]
        assert loaded == [False]
    lake = Paths.under(data).lake
    exact, uncached, draft = (lake.read("trees", m) for m in ("px", "px-nocache", "px-draft"))
    assert exact.fingerprint == uncached.fingerprint != draft.fingerprint
    assert np.array_equal(exact.vectors, uncached.vectors)
    # Reduced-size decode stays near the exact pixels (raw-pixel vectors are the pixels themselves).
    assert not np.array_equal(exact.vectors, draft.vectors)
    assert np.abs(exact.vectors - draft.vectors).mean() < 0.05 * np.abs(exact.vectors).mean()
    runs = warehouse.query(data / "warehouse.duckdb", "SELECT model, new, wait_s FROM embedding_runs ORDER BY finished_at")
    assert list(runs["new"]) == [9, 9, 9, 0] and runs["wait_s"].notna().all()
