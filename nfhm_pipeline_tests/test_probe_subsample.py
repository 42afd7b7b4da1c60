"""Probes on very large train sets: the catalog's ``probe_max_train`` fits them on a stratified
subsample of the train images, stated in every metrics row; without it, seed 001's protocol on
every train image, unchanged.

The stage runs for real (``stages.linear_probe_metrics.run``) on a warehouse, manifest and lake
written here from numpy vectors: 3,750 images, 5 species of unequal size (one Gaussian cluster
each: the probes on all 3,000 train images score about 0.98, on 500 of them 1 to 3 points less),
64 dimensions, a 20 % hold-out, a coarser level (genus) missing for 5 % of the images.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest

from helpers import write_split
from nfhm_pipeline.catalog import DatasetSpec, ModelSpec, parse_catalog
from nfhm_pipeline.errors import CatalogError, EvaluationError
from nfhm_pipeline.evaluation.linear_probe import stratified_subsample
from nfhm_pipeline.evaluation.splits import make_split, split_identity
from nfhm_pipeline.evaluation.tables import probe_tables
from nfhm_pipeline.stages import linear_probe_metrics
from nfhm_pipeline.stages.base import Paths, load_evaluation_inputs
from nfhm_pipeline.store import warehouse
from nfhm_pipeline.store.embedding_store import EmbeddingTable
from nfhm_pipeline.store.schemas import WAREHOUSE_TABLES

COUNTS = (1500, 938, 750, 375, 187)  # 40 / 25 / 20 / 10 / 5 %
GENUS = {"s0": "g0", "s1": "g0", "s2": "g1", "s3": "g1", "s4": "g2"}
MODEL = ModelSpec(key="vec", loader="raw_pixels", params={})
DATASET = DatasetSpec(name="synth", reader="label_csv", params={}, labels=("species", "genus"), resamples=100)
PROBE_TASKS = ("linear_probe", "logistic_probe")


def collection(dim: int = 64, seed: int = 0):
    """(labels frame: image_id, species, genus (5 % missing), group; float32 vectors [n, dim])."""
    rng = np.random.default_rng(seed)
    species = np.repeat([f"s{k}" for k in range(len(COUNTS))], COUNTS)
    n = len(species)
    rng.shuffle(species)
    centres = rng.normal(scale=0.5, size=(len(COUNTS), dim))
    vectors = (centres[[int(s[1:]) for s in species]] + rng.normal(size=(n, dim))).astype(np.float32)
    genus = pd.Series(species).map(GENUS).where(rng.random(n) > 0.05)
    labels = pd.DataFrame({"image_id": [f"img{i:05d}" for i in range(n)], "species": species, "genus": genus,
                           "group": None})
    return labels, vectors


@pytest.fixture(scope="module", autouse=True)
def one_blas_thread():
    """BLAS on one thread: these fits are small matrix products, which a BLAS thread per core
    slows threefold on a machine whose cores are busy with other work (answers are unchanged)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """A data folder holding the collection's manifest, its split (3,000 train / 750 test) and its
    vectors in the lake, as the earlier stages leave them."""
    paths = Paths.under(tmp_path_factory.mktemp("data"))
    labels, vectors = collection()
    labels.to_parquet(paths.manifest(DATASET.name))
    split = make_split(labels, label_column="species", test_fraction=0.2, seed=0, n_folds=5).assignments
    write_split(paths.warehouse, DATASET.name, split, split_identity(split, 0))
    paths.lake.write(DATASET.name, MODEL.key, EmbeddingTable(labels["image_id"].to_numpy(dtype=object), vectors,
                                                             "fp-synthetic"))
    return paths


def run_stage(paths: Paths, max_train: int | None, seed: int = 0) -> dict[str, pd.DataFrame]:
    dataset = dataclasses.replace(DATASET, probe_max_train=max_train, seed=seed)
    linear_probe_metrics.run(dataset, MODEL, paths)
    where = {"dataset": DATASET.name, "model": MODEL.key}
    return {table: warehouse.read_table(paths.warehouse, table, **where)
            for table in ("metrics", "predictions", "evaluation_exclusions")}


def by_row(metrics: pd.DataFrame) -> pd.DataFrame:
    return metrics.set_index(["task", "level", "metric"]).sort_index()


# --- the subsample ---------------------------------------------------------------------------------

def test_the_subsample_is_proportional_within_one_image_per_class_and_spread_over_the_folds():
    counts = np.array([1200, 750, 600, 300, 150])
    labels = np.repeat(np.array(["a", "b", "c", "d", "e"]), counts)
    folds = np.random.default_rng(1).integers(0, 5, size=len(labels))
    picked = stratified_subsample(labels, 500, seed=3, spread=folds)
    assert len(picked) == 500 and len(np.unique(picked)) == 500 and np.all(np.diff(picked) > 0)
    got = pd.Series(labels[picked]).value_counts().sort_index().to_numpy()
    assert np.all(np.abs(got - 500 * counts / counts.sum()) <= 1), got
    for cls in "abcde":  # a class's picks go round the folds: per-fold counts differ by at most 1
        per_fold = np.bincount(folds[picked][labels[picked] == cls], minlength=5)
        assert per_fold.max() - per_fold.min() <= 1, (cls, per_fold)


def test_a_tiny_class_keeps_two_images_taken_back_from_the_largest_class():
    """The documented rule on 1500/900/450/147/3 images, 500 drawn: shares 250/150/75/24.5/0.5,
    largest remainder gives the tie to 'd' (first in order), 'e' is raised to its floor of 2 and
    the 2 extra images come from 'a', the class with most images above its floor."""
    counts = np.array([1500, 900, 450, 147, 3])
    labels = np.repeat(np.array(["a", "b", "c", "d", "e"]), counts)
    got = pd.Series(labels[stratified_subsample(labels, 500, seed=0)]).value_counts().sort_index()
    assert got.to_dict() == {"a": 248, "b": 150, "c": 75, "d": 25, "e": 2}
    single = np.repeat(np.array(["a", "z"]), [400, 1])  # a class of one image keeps it
    assert "z" in single[stratified_subsample(single, 50, seed=0)]


def test_the_subsample_is_reproducible_for_a_seed_and_differs_for_another():
    labels = np.repeat(np.array(["a", "b", "c"]), [600, 300, 100])
    first, again = stratified_subsample(labels, 200, seed=7), stratified_subsample(labels, 200, seed=7)
    other = stratified_subsample(labels, 200, seed=8)
    np.testing.assert_array_equal(first, again)
    assert len(np.intersect1d(first, other)) < 150
    np.testing.assert_array_equal(stratified_subsample(labels, 1000, seed=7), np.arange(1000))  # not larger


def test_more_classes_than_the_subsample_can_hold_is_a_clear_error():
    labels = np.repeat(np.array([f"c{k}" for k in range(30)]), 5)
    with pytest.raises(EvaluationError, match="cannot keep all 30 classes of level 'species'.*at least 30"):
        stratified_subsample(labels, 20, seed=0, level="species")


# --- the stage --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(stored):
    """The stage's rows without the field (every train image) and with probe_max_train: 500."""
    return {"full": run_stage(stored, None), "sub": run_stage(stored, 500)}


def test_without_the_field_the_stage_is_the_unchanged_probe_on_every_train_image(stored, runs):
    inputs = load_evaluation_inputs(stored, DATASET, MODEL.key)
    reference = probe_tables(inputs.frame, inputs.vectors, DATASET.labels, seed=0).frames()[0]
    got, want = by_row(runs["full"]["metrics"]), by_row(reference)
    assert len(got) == 16 and list(got.index) == list(want.index)
    np.testing.assert_array_equal(got["value"].to_numpy(), want["value"].to_numpy())  # bit-identical
    np.testing.assert_array_equal(got["std"].to_numpy(), want["std"].to_numpy())
    species = got.xs("species", level="level")
    assert (species["train_n"] == 3000).all() and (species["train_available"] == 3000).all()
    genus = got.xs("genus", level="level")  # genus: the train images with a genus label
    assert (genus["train_n"] == genus["train_available"]).all() and (genus["train_n"] < 3000).all()
    assert got.loc[("linear_probe", "species", "test_accuracy"), "value"] > 0.9  # something to learn


def test_with_the_field_the_probes_fit_a_stated_subsample_and_score_every_test_image(runs):
    sub, full = runs["sub"], runs["full"]
    got, ref = by_row(sub["metrics"]), by_row(full["metrics"])
    species = got.xs("species", level="level")
    assert (species["train_n"] == 500).all() and (species["train_available"] == 3000).all()
    assert (species.xs("cv_accuracy", level="metric")["n"] == 500).all()  # the CV ran over the subsample
    assert (species.xs("test_accuracy", level="metric")["n"] == 750).all()
    genus, genus_ref = got.xs("genus", level="level"), ref.xs("genus", level="level")
    assert (genus["train_n"] < genus["train_available"]).all()
    np.testing.assert_array_equal(genus["train_available"].to_numpy(), genus_ref["train_available"].to_numpy())
    for task in PROBE_TASKS:  # within a few points of the probe on all 3,000 train images
        for level in DATASET.labels:
            for metric, tolerance in (("test_accuracy", 0.04), ("cv_accuracy", 0.05)):
                a, b = got.loc[(task, level, metric), "value"], ref.loc[(task, level, metric), "value"]
                assert abs(a - b) < tolerance, (task, level, metric, a, b)
    # the test images are never subsampled: every one is predicted, as in the full run
    a = sub["predictions"].sort_values(["task", "level", "image_id"])["image_id"].tolist()
    b = full["predictions"].sort_values(["task", "level", "image_id"])["image_id"].tolist()
    assert a == b and int((sub["predictions"]["level"] == "species").sum()) == 2 * 750
    # left-out train images are not 'excluded'; those without a genus are recorded as in the full run
    key = ["task", "level", "image_id", "split", "reason"]
    assert sub["evaluation_exclusions"][key].sort_values(key).values.tolist() == \
        full["evaluation_exclusions"][key].sort_values(key).values.tolist()


def test_the_stage_subsample_follows_the_seed(stored):
    inputs = load_evaluation_inputs(stored, DATASET, MODEL.key)
    frame = inputs.frame
    a = linear_probe_metrics.probe_subsample(frame, "species", 500, seed=0)
    b = linear_probe_metrics.probe_subsample(frame.iloc[::-1].reset_index(drop=True), "species", 500, seed=0)
    c = linear_probe_metrics.probe_subsample(frame, "species", 500, seed=1)
    ids = frame["image_id"].to_numpy()
    assert set(ids[a]) == set(frame["image_id"][::-1].to_numpy()[b])  # row order does not matter: image_id does
    assert set(ids[a]) != set(ids[c])
    train = (frame["split"] == "train").to_numpy()
    assert (~train <= a).all() and int((a & train).sum()) == 500  # every test row kept
    counts = frame.loc[a & train, "species"].value_counts().sort_index()
    share = frame.loc[train, "species"].value_counts().sort_index() * 500 / train.sum()
    assert (abs(counts - share) <= 1).all(), (counts, share)
    assert linear_probe_metrics.probe_subsample(frame, "species", None, seed=0) is None
    assert linear_probe_metrics.probe_subsample(frame, "species", int(train.sum()), seed=0) is None  # not larger


def test_an_older_warehouse_gains_the_train_size_columns(stored, tmp_path):
    db = tmp_path / "warehouse.duckdb"
    before = [c for c in WAREHOUSE_TABLES["metrics"] if c.name not in ("train_n", "train_available")]
    con = duckdb.connect(str(db))
    con.execute(f"CREATE TABLE metrics ({', '.join(c.ddl for c in before)})")
    con.execute("INSERT INTO metrics (dataset, model, task, metric, value) VALUES "
                "('old', 'm', 'linear_probe', 'cv_accuracy', 0.5)")
    con.close()
    for table in ("splits",):  # the stage reads the split from its own warehouse
        rows = warehouse.read_table(stored.warehouse, table, dataset=DATASET.name)
        warehouse.replace_many(db, [(table, rows, {"dataset": DATASET.name})])
    paths = Paths(tmp_path, stored.lake_root)
    Path(paths.manifest(DATASET.name)).write_bytes(Path(stored.manifest(DATASET.name)).read_bytes())
    rows = run_stage(paths, 500)["metrics"]
    assert (rows.loc[rows["level"] == "species", "train_n"] == 500).all()
    old = warehouse.read_table(db, "metrics", dataset="old")
    assert len(old) == 1 and pd.isna(old["train_n"].iloc[0]) and pd.isna(old["train_available"].iloc[0])
    types = dict(warehouse.query(db, "SELECT column_name, data_type FROM information_schema.columns "
                                     "WHERE table_name = 'metrics'").itertuples(index=False))
    assert types["train_n"] == "BIGINT" and types["train_available"] == "BIGINT"


# --- the catalog field ------------------------------------------------------------------------------

CATALOG = {"datasets": {"birds": {"reader": "image_folder", "root": "images", "labels": ["species"]}},
           "models": {"raw-pixels": {"loader": "raw_pixels"}}}


def with_field(value) -> dict:
    return {**CATALOG, "datasets": {"birds": {**CATALOG["datasets"]["birds"], "probe_max_train": value}}}


def test_the_catalog_reads_probe_max_train_and_defaults_to_none(tmp_path):
    assert parse_catalog(CATALOG, tmp_path / "c.yaml").datasets["birds"].probe_max_train is None
    assert parse_catalog(with_field(20000), tmp_path / "c.yaml").datasets["birds"].probe_max_train == 20000


@pytest.mark.parametrize("value", [0, 9, -500, "500", 12.5, True, [500]])
def test_a_bad_probe_max_train_is_a_catalog_error_naming_the_field(tmp_path, value):
    with pytest.raises(CatalogError, match=r"dataset 'birds': field 'probe_max_train' must be a whole number "
                                           r"of train images, at least 10"):
        parse_catalog(with_field(value), tmp_path / "c.yaml")
