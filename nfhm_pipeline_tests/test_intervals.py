"""Intervals on the pipeline's own rows (issue 13): evaluation/intervals.py against plain references,
and what the demo run stores (metrics ci_low/ci_high, per-class Wilson, model_differences)."""
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score

from nfhm_pipeline.evaluation.intervals import model_differences, resampled_scores
from nfhm_pipeline.store import warehouse


def _labels(seed=0, n=60, k=4, accuracy=0.6):
    rng = np.random.default_rng(seed)
    true = rng.choice([f"c{i}" for i in range(k)], n)
    pred = np.where(rng.random(n) < accuracy, true, rng.choice([f"c{i}" for i in range(k)], n)).astype(object)
    return true.astype(object), pred


def test_resampled_scores_with_unit_and_integer_weights_equal_sklearn():
    true, pred = _labels()
    pred[3] = None  # a "no prediction" counts as wrong
    rng = np.random.default_rng(1)
    counts = np.vstack([np.ones(len(true), int), rng.integers(0, 4, len(true))])
    scores = resampled_scores(true, pred, counts)
    for row, weights in enumerate(counts):
        t = np.repeat(true, weights).astype(str)
        p = np.repeat(np.where(pd.isna(pred), "<none>", pred), weights).astype(str)
        assert scores["accuracy"][row] == pytest.approx(np.mean(t == p))
        assert scores["balanced"][row] == pytest.approx(balanced_accuracy_score(t, p) if "<none>" not in p
                                                        else np.mean([np.mean(p[t == c] == c) for c in np.unique(t)]))
        labels = sorted(set(t) | (set(p) - {"<none>"}))
        assert scores["macro_f1"][row] == pytest.approx(f1_score(t, p, labels=labels, average="macro",
                                                                 zero_division=0))


def _predictions(correct_by_model: dict[str, np.ndarray], units=None):
    rows = []
    for model, correct in correct_by_model.items():
        for i, ok in enumerate(correct):
            rows.append({"task": "knn", "level": "species", "grp": "all", "rule": "top1_cosine", "model": model,
                         "image_id": f"img{i:03d}", "true_label": "a", "predicted_label": "a" if ok else "b"})
    return pd.DataFrame(rows)


def test_model_differences_compare_every_model_with_the_best_on_the_same_resamples():
    rng = np.random.default_rng(0)
    n = 200
    best = rng.random(n) < 0.9
    close = best.copy()
    close[:3] = ~close[:3]  # differs on 3 images: no detectable difference
    poor = rng.random(n) < 0.5
    frame = model_differences(_predictions({"best": best, "close": close, "poor": poor}), seed=0, n_resamples=500)
    assert set(frame["model_a"]) == {"best"} and set(frame["model_b"]) == {"close", "poor"}
    rows = frame.set_index("model_b")
    assert rows.loc["poor", "p_holm"] < 0.01 and rows.loc["close", "p_holm"] >= 0.05
    assert rows.loc["poor", "difference"] == pytest.approx(best.mean() - poor.mean())
    assert rows.loc["poor", "ci_low"] > 0 and rows.loc["close", "ci_low"] <= 0 <= rows.loc["close", "ci_high"]
    assert (rows["p_holm"] >= rows["p_value"]).all()
    assert set(frame["metric"]) == {"top1_cosine"} and (frame["n"] == n).all()
    again = model_differences(_predictions({"best": best, "close": close, "poor": poor}), seed=0, n_resamples=500)
    pd.testing.assert_frame_equal(frame, again)  # seeded


def test_grouped_resampling_widens_the_difference_interval():
    """Items correlated within units: resampling units gives a wider interval than resampling images."""
    rng = np.random.default_rng(3)
    n_units, per = 20, 10
    unit_effect = np.repeat(rng.random(n_units) < 0.5, per)
    a = unit_effect | (rng.random(n_units * per) < 0.1)
    b = np.zeros_like(a) | (rng.random(n_units * per) < 0.3)
    predictions = _predictions({"a": a, "b": b})
    units = pd.Series(np.repeat([f"u{i}" for i in range(n_units)], per),
                      index=[f"img{i:03d}" for i in range(n_units * per)])
    images = model_differences(predictions, seed=0, n_resamples=500).iloc[0]
    grouped = model_differences(predictions, seed=0, n_resamples=500, units=units).iloc[0]
    assert grouped["ci_high"] - grouped["ci_low"] > 1.5 * (images["ci_high"] - images["ci_low"])


def test_the_demo_stores_intervals_that_contain_their_values(demo_run):
    data_dir, _, _ = demo_run
    db = data_dir / "warehouse.duckdb"
    metrics = warehouse.read_table(db, "metrics")
    boot = metrics[metrics["ci_method"] == "bootstrap-paired"]
    assert len(boot) and set(boot["task"]) == {"knn", "linear_probe", "logistic_probe", "zero_shot", "retrieval"}
    shot = metrics[metrics["task"].isin(["zero_shot", "retrieval"]) & metrics["model"].eq("tiny-clip")]
    assert len(shot) and (shot["ci_method"] == "bootstrap-paired").all()
    assert ((boot["ci_low"] <= boot["value"] + 1e-12) & (boot["value"] <= boot["ci_high"] + 1e-12)).all()
    assert (boot["ci_low"] >= 0).all() and (boot["ci_high"] <= 1).all()
    cv = metrics[metrics["ci_method"] == "cv-std"]
    assert len(cv) and np.allclose(cv["ci_high"] - cv["value"], cv["std"])
    per_class = warehouse.read_table(db, "per_class_metrics")
    assert per_class["recall_ci_low"].notna().all()
    assert ((per_class["recall_ci_low"] <= per_class["recall"] + 1e-12)
            & (per_class["recall"] <= per_class["recall_ci_high"] + 1e-12)).all()
    differences = warehouse.read_table(db, "model_differences")
    assert len(differences) and differences["p_holm"].between(0, 1).all()
    runs = warehouse.read_table(db, "runs", task="knn")
    assert (runs["ci_resamples"] == 1000).all() and set(runs["ci_unit"]) == {"image"}


def test_paired_resamples_are_shared_by_every_model_of_a_dataset(demo_run):
    """The same seed and test images give the same resamples: a model's interval is a function of
    its correctness alone, so two models with identical predictions get identical intervals."""
    from nfhm_pipeline.evaluation.confidence import resample_counts

    a = resample_counts(50, 200, seed=7)
    b = resample_counts(50, 200, seed=7)
    assert np.array_equal(a, b) and not np.array_equal(a, resample_counts(50, 200, seed=8))


def _zero_shot_case(seed=0, n=40, classes=("ant", "bee", "cat"), dim=8, zero_rows=(3,)):
    from nfhm_pipeline.evaluation.zero_shot import DEFAULT_TEMPLATES

    rng = np.random.default_rng(seed)
    labels = rng.choice(classes, n)
    centers = {c: rng.normal(size=dim) for c in classes}
    vectors = np.stack([centers[c] + 1.5 * rng.normal(size=dim) for c in labels]).astype(np.float32)
    vectors[list(zero_rows)] = 0.0  # no prediction: a miss, and never a retrieval candidate
    frame = pd.DataFrame({"image_id": [f"i{i:03d}" for i in range(n)], "species": labels,
                          "split": ["test"] * n})
    templates = DEFAULT_TEMPLATES[:2]
    prompts = pd.DataFrame([{"level": "species", "class": c, "template": t} for c in classes for t in templates])
    text = np.stack([centers[c] + 0.3 * rng.normal(size=dim) for c in prompts["class"]]).astype(np.float32)
    return frame, vectors, prompts, text


def test_zero_shot_and_retrieval_item_scores_average_to_the_stored_values():
    """Each metric row is exactly the mean of the per-item scores the bootstrap resamples: the
    item order, the misses (an all-zero vector) and the text-query side all line up."""
    from nfhm_pipeline.evaluation.tables import zero_shot_tables

    frame, vectors, prompts, text = _zero_shot_case()
    tables = zero_shot_tables(frame, vectors, prompts, text, ["species"])
    metrics = tables.frames()[0].set_index(["task", "metric"])["value"]
    assert len(tables.item_scores) == len(metrics)
    for item in tables.item_scores:
        assert np.mean(item.scores) == pytest.approx(metrics[(item.task, item.metric)], abs=1e-12), item.metric
        if item.images:
            assert list(item.ids) == list(frame["image_id"]) and item.scores[3] == 0.0
        else:
            assert list(item.ids) == ["text:ant", "text:bee", "text:cat"]


def test_zero_shot_interval_equals_a_plain_resampling_loop_and_scipy_bootstrap():
    from scipy import stats

    from nfhm_pipeline.evaluation.confidence import resample_counts
    from nfhm_pipeline.evaluation.intervals import add_intervals
    from nfhm_pipeline.evaluation.tables import zero_shot_tables

    frame, vectors, prompts, text = _zero_shot_case(seed=1, n=80)
    tables = zero_shot_tables(frame, vectors, prompts, text, ["species"])
    add_intervals(tables, frame, seed=5, n_resamples=2000)
    metrics = tables.frames()[0].set_index("metric")
    item = next(i for i in tables.item_scores if i.metric == "top1_ensemble")
    # Plain reference: the same count rows, one weighted mean at a time.
    counts = resample_counts(len(item.ids), 2000, 5)
    means = [sum(c * s for c, s in zip(row, item.scores)) / row.sum() for row in counts]
    low, high = np.percentile(means, [2.5, 97.5])
    assert metrics.loc["top1_ensemble", "ci_low"] == pytest.approx(low, abs=1e-12)
    assert metrics.loc["top1_ensemble", "ci_high"] == pytest.approx(high, abs=1e-12)
    ref = stats.bootstrap((item.scores,), np.mean, n_resamples=2000, method="percentile",
                          random_state=np.random.default_rng(0)).confidence_interval
    assert abs(ref.low - low) < 0.03 and abs(ref.high - high) < 0.03  # Monte-Carlo error of B = 2000
    text_row = metrics.loc["text_to_image_recall@1"]
    assert text_row["ci_method"] == "bootstrap-paired" and text_row["ci_low"] <= text_row["value"] <= text_row["ci_high"]


def test_zero_shot_intervals_resample_groups_when_the_split_is_grouped():
    from nfhm_pipeline.evaluation.intervals import add_intervals
    from nfhm_pipeline.evaluation.tables import zero_shot_tables

    frame, vectors, prompts, text = _zero_shot_case(seed=2, n=60, zero_rows=())
    # Ten "patients" of six images each, each patient's images alike: hits come in blocks.
    frame["species"] = np.repeat(frame["species"].to_numpy()[::6], 6)
    vectors = np.repeat(vectors[::6], 6, axis=0)
    units = pd.Series(np.repeat([f"p{i}" for i in range(10)], 6), index=frame["image_id"])
    width = {}
    for name, by in (("images", None), ("groups", units)):
        tables = zero_shot_tables(frame, vectors, prompts, text, ["species"])
        add_intervals(tables, frame, seed=0, n_resamples=1000, units=by)
        row = tables.frames()[0].set_index("metric").loc["top1_ensemble"]
        width[name] = row["ci_high"] - row["ci_low"]
    assert width["groups"] > 1.5 * width["images"]
