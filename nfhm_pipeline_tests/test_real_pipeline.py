"""Real images, real weights (../shared/data): MobileNetV2 ImageNet features must score well above
chance on every task, and the randomly initialised tiny CLIP near chance.

One session-scoped materialization of the `shared` catalog (Leeds butterflies + brain MRI,
MobileNetV2 and tiny-clip) through a real Dagster instance serves every assertion.
"""
import dagster as dg
import pandas as pd
import pytest

from conftest import SHARED_DATA, local_resources
from nfhm_pipeline.catalog import load_catalog
from nfhm_pipeline.runner import materialize_catalog
from nfhm_pipeline.store import warehouse

pytestmark = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"real-data test: {SHARED_DATA} is absent")

DATASETS = {"leeds_butterfly": ("species", 10), "brain_mri": ("label", 4)}


@pytest.fixture(scope="module")
def real_run(tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setenv("NFHM_SHARED_DATA", str(SHARED_DATA))
    data_dir = tmp_path_factory.mktemp("real-data")
    with dg.instance_for_test() as instance:
        outcome = materialize_catalog(load_catalog("shared"), instance=instance, resources=local_resources(data_dir),
                                      datasets=list(DATASETS), models=["mobilenet-v2-imagenet", "tiny-clip"],
                                      log=lambda *_: None)
    return data_dir, outcome


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def metric(data_dir, dataset, model, task, level, name):
    rows = warehouse.query(data_dir / "warehouse.duckdb",
                           "SELECT value FROM metrics WHERE dataset = ? AND model = ? AND task = ? AND level = ? "
                           "AND grp = 'all' AND metric = ?", [dataset, model, task, level, name])
    assert len(rows) == 1, (dataset, model, task, level, name)
    return float(rows["value"][0])


def test_real_catalog_materializes(real_run):
    _, outcome = real_run
    assert outcome.failed == {}


@pytest.mark.parametrize("dataset", list(DATASETS))
@pytest.mark.parametrize("task, name", [("knn", "top1_cosine"), ("knn", "mean_cosine"), ("knn", "top1_euclidean"),
                                        ("knn", "mean_euclidean"), ("linear_probe", "test_accuracy"),
                                        ("logistic_probe", "test_accuracy")])
def test_mobilenet_features_score_well_above_chance(real_run, dataset, task, name):
    data_dir, _ = real_run
    level, n_classes = DATASETS[dataset]
    chance = 1 / n_classes
    assert metric(data_dir, dataset, "mobilenet-v2-imagenet", task, level, name) > chance + 0.35


# Random features are far from useless for 1-NN on the brain MRI set: measured 0.70 top-1 cosine
# (chance 0.31) against MobileNetV2's 0.81, because slices of the same scans sit on both sides of
# the split. Leeds butterflies have no such near-duplicates: random features stay near chance.
MARGIN = {"leeds_butterfly": 0.3, "brain_mri": 0.08}


@pytest.mark.parametrize("dataset", list(DATASETS))
def test_random_tiny_model_scores_below_real_features(real_run, dataset):
    data_dir, _ = real_run
    level, n_classes = DATASETS[dataset]
    tiny = metric(data_dir, dataset, "tiny-clip", "knn", level, "top1_cosine")
    real = metric(data_dir, dataset, "mobilenet-v2-imagenet", "knn", level, "top1_cosine")
    assert real - tiny > MARGIN[dataset], (real, tiny)


@pytest.mark.parametrize("dataset", list(DATASETS))
def test_random_tiny_model_zero_shot_is_near_chance(real_run, dataset):
    data_dir, _ = real_run
    level, n_classes = DATASETS[dataset]
    value = metric(data_dir, dataset, "tiny-clip", "zero_shot", level, "top1_ensemble")
    assert abs(value - 1 / n_classes) < 0.25


@pytest.mark.parametrize("dataset", list(DATASETS))
def test_real_features_beat_the_random_model_significantly(real_run, dataset):
    """Issue 13 on real data: MobileNetV2 against the random tiny CLIP, paired on the shared split."""
    data_dir, _ = real_run
    level, _ = DATASETS[dataset]
    rows = warehouse.query(data_dir / "warehouse.duckdb",
                           "SELECT * FROM model_differences WHERE dataset = ? AND task = 'knn' AND level = ? "
                           "AND grp = 'all' AND metric = 'top1_cosine'", [dataset, level])
    assert len(rows) == 1
    row = rows.iloc[0]
    assert row["model_a"] == "mobilenet-v2-imagenet" and row["model_b"] == "tiny-clip"
    assert row["p_holm"] < 0.01 and row["p_mcnemar"] < 0.01 and row["ci_low"] > 0


@pytest.mark.parametrize("dataset", list(DATASETS))
def test_one_model_probed_with_two_seeds_is_tied_with_itself(real_run, dataset, monkeypatch_module):
    """The same embeddings probed with two probe seeds: the paired comparison must not call the
    difference real."""
    from nfhm_pipeline.evaluation.intervals import model_differences
    from nfhm_pipeline.evaluation.tables import probe_tables
    from nfhm_pipeline.stages.base import Paths, load_evaluation_inputs

    data_dir, _ = real_run
    spec = load_catalog("shared").datasets[dataset]
    inputs = load_evaluation_inputs(Paths.under(data_dir), spec, "mobilenet-v2-imagenet")
    parts = []
    for seed in (0, 1):
        predictions = probe_tables(inputs.frame, inputs.vectors, spec.labels, seed=seed).frames()[2]
        parts.append(predictions[predictions["task"] == "linear_probe"].assign(model=f"seed{seed}"))
    frame = model_differences(pd.concat(parts, ignore_index=True), seed=0, n_resamples=1000)
    assert len(frame) and (frame["p_holm"] >= 0.05).all()


# On brain MRI, slices of one scan sit on both sides of the split, so the single nearest neighbour
# finds a near-copy whatever the features: top-1 is measured at 3 points apart (p_holm 0.26, not
# significant), while the per-class mean rule, which near-copies cannot carry, is 31 points apart.
RAW_PIXELS_RULE = {"leeds_butterfly": "top1_cosine", "brain_mri": "mean_cosine"}


@pytest.mark.parametrize("dataset", list(DATASETS))
def test_mobilenet_beats_raw_pixels_significantly(real_run, dataset):
    """Issue 13's real-data check: MobileNetV2 against the raw-pixel baseline, paired on the shared
    split (raw-pixels embedded and scored here, through the same stages, after the run)."""
    from nfhm_pipeline.evaluation.intervals import model_differences
    from nfhm_pipeline.stages import image_embeddings, knn_metrics
    from nfhm_pipeline.stages.base import Device, Paths, read_split, resample_units

    data_dir, _ = real_run
    catalog = load_catalog("shared")
    spec, raw = catalog.datasets[dataset], catalog.models["raw-pixels"]
    paths = Paths.under(data_dir)
    for stage in (image_embeddings, knn_metrics):
        stage.run(spec, raw, paths, Device(name="cpu", num_workers=0))
    level, _ = DATASETS[dataset]
    predictions = warehouse.query(data_dir / "warehouse.duckdb",
                                  "SELECT * FROM predictions WHERE dataset = ? AND task = 'knn' AND level = ? "
                                  "AND grp = 'all' AND rule = ? AND model IN "
                                  "('mobilenet-v2-imagenet', 'raw-pixels')", [dataset, level, RAW_PIXELS_RULE[dataset]])
    assert set(predictions["model"]) == {"mobilenet-v2-imagenet", "raw-pixels"}
    frame = model_differences(predictions, seed=spec.seed if spec.seed is not None else 0,
                              units=resample_units(spec, read_split(paths, dataset)))
    row = frame.iloc[0]
    assert len(frame) == 1 and (row["model_a"], row["model_b"]) == ("mobilenet-v2-imagenet", "raw-pixels")
    assert row["p_holm"] < 0.01 and row["p_mcnemar"] < 0.001 and row["ci_low"] > 0, row.to_dict()
