"""``resample_by`` (issue 13): what one bootstrap draw takes — an image, the split's leakage unit or
the dataset's ``group`` column — validated at catalog load and used by every interval."""
import dataclasses

import numpy as np
import pandas as pd
import pytest

from nfhm_pipeline.catalog import CatalogError, load_catalog
from nfhm_pipeline.stages.base import resample_unit_name, resample_units

MODELS = "models:\n  raw-pixels:\n    loader: raw_pixels\n    image_size: 8\n"


def catalog_with(tmp_path, extra: str):
    csv = tmp_path / "labels.csv"
    csv.write_text("path,species,patient\na.png,x,p1\n", encoding="utf-8")
    path = tmp_path / "cat.yaml"
    path.write_text("datasets:\n  scans:\n    reader: label_csv\n    csv: labels.csv\n    path_column: path\n"
                    "    labels: [species]\n" + "".join(f"    {line}\n" for line in extra.splitlines()) + MODELS,
                    encoding="utf-8")
    return path


@pytest.mark.parametrize("extra, expected", [
    ("", None),
    ("resample_by: image", "image"),
    ("group: patient\nresample_by: patient", "patient"),
    ("split: {group_by: patient}\nresample_by: patient", "patient"),
])
def test_the_catalog_accepts_an_image_or_a_declared_per_image_column(tmp_path, extra, expected):
    assert load_catalog(catalog_with(tmp_path, extra)).datasets["scans"].resample_by == expected


@pytest.mark.parametrize("extra, says", [
    ("resample_by: patient", "declare it as 'group' or 'split.group_by' first"),
    ("group: patient\nresample_by: ward", "must be one of ['image', 'patient']"),
    ("resample_by: [image]", "must be one of ['image']"),
    ("resample_by: 3", "got 3"),
])
def test_the_catalog_refuses_a_unit_the_manifest_does_not_carry(tmp_path, extra, says):
    with pytest.raises(CatalogError, match="resample_by") as error:
        load_catalog(catalog_with(tmp_path, extra))
    assert says in str(error.value)


def test_units_follow_the_setting_and_an_image_without_a_value_is_its_own_unit(tmp_path):
    spec = load_catalog(catalog_with(tmp_path, "group: patient\nsplit: {group_by: patient}")).datasets["scans"]
    ids = ["a", "b", "c", "d"]
    splits = pd.DataFrame({"image_id": ids, "split_group": ["p1", "p1", "p2", "p3"]})
    manifest = pd.DataFrame({"image_id": ids, "group": ["p1", "p1", None, "p3"]})
    units = resample_units(spec, splits, manifest)  # grouped split, no resample_by: the leakage unit
    assert list(units) == ["p1", "p1", "p2", "p3"] and resample_unit_name(spec, units) == "patient"
    as_images = dataclasses.replace(spec, resample_by="image")
    assert resample_units(as_images, splits, manifest) is None
    assert resample_unit_name(as_images, None) == "image"
    by_group = dataclasses.replace(spec, split=dataclasses.replace(spec.split, group_by=None), resample_by="patient")
    units = resample_units(by_group, splits, manifest)
    assert list(units) == ["group:p1", "group:p1", "image:c", "group:p3"]
    assert resample_unit_name(by_group, units) == "patient"


def test_resampling_the_demo_by_taxa_widens_its_intervals_and_is_recorded(demo_run):
    """The demo's specimens within one taxa group look alike: drawing whole groups must give wider
    intervals than drawing images, and the inputs say which unit they drew."""
    from nfhm_pipeline.evaluation.tables import knn_tables
    from nfhm_pipeline.stages.base import Paths, load_evaluation_inputs, with_intervals

    data_dir, _, _ = demo_run
    spec = load_catalog("demo").datasets["demo_shapes"]
    width = {}
    for by in ("image", "taxa"):
        dataset = dataclasses.replace(spec, resample_by=by)
        inputs = load_evaluation_inputs(Paths.under(data_dir), dataset, "raw-pixels")
        assert inputs.resample_unit == by
        tables = with_intervals(knn_tables(inputs.frame, inputs.vectors, ["family"]), dataset, inputs)
        row = tables.frames()[0].set_index(["level", "grp", "metric"]).loc[("family", "all", "top1_cosine")]
        width[by] = row["ci_high"] - row["ci_low"]
    assert np.isfinite(list(width.values())).all() and width["taxa"] > width["image"]
