"""Specification of the standardised linear probe (LinearSVC, C = 100 / N)."""
import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_digits
from sklearn.svm import LinearSVC

from nfhm_pipeline.errors import EvaluationError
from nfhm_pipeline.evaluation.linear_probe import linear_probe_cv, probe_on_split
from nfhm_pipeline.evaluation.splits import make_split


@pytest.fixture(scope="module")
def digits():
    return load_digits(return_X_y=True)


def reference_macro_f1(y_true, y_pred) -> float:
    labels = sorted(set(y_true) | set(y_pred))
    f1s = []
    for c in labels:
        tp = sum(1 for t, p in zip(y_true, y_pred) if t == c and p == c)
        fp = sum(1 for t, p in zip(y_true, y_pred) if t != c and p == c)
        fn = sum(1 for t, p in zip(y_true, y_pred) if t == c and p != c)
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(f1s) / len(f1s)


def reference_fit_predict(X_fit, y_fit, X_eval):
    """Standardise with statistics of the fit rows only, then LinearSVC with C = 100 / n_fit."""
    mean, std = X_fit.mean(axis=0), X_fit.std(axis=0)
    std[std == 0] = 1.0
    svc = LinearSVC(C=100 / len(y_fit), random_state=0).fit((X_fit - mean) / std, y_fit)
    return svc.predict((X_eval - mean) / std)


def test_standardised_linear_svc_separates_digits(digits):
    X, y = digits
    result = linear_probe_cv(X, y)
    assert result.cv_accuracy_mean > 0.9 and result.test_accuracy > 0.9
    assert result.cv_macro_f1_mean > 0.9 and result.test_macro_f1 > 0.9
    assert len(result.fold_scores) == 5 and result.cv_accuracy_std < 0.05


def test_logistic_probe_separates_digits(digits):
    X, y = digits
    assert linear_probe_cv(X[:800], y[:800], classifier="logistic").test_accuracy > 0.9


def test_random_labels_score_near_chance(digits):
    X = digits[0][:800]
    y = np.random.default_rng(0).integers(0, 10, len(X))
    result = linear_probe_cv(X, y)
    assert result.cv_accuracy_mean < 0.2 and result.test_accuracy < 0.2


def test_hold_out_is_a_fifth_and_disjoint_from_training(digits):
    X, y = digits
    result = linear_probe_cv(X[:500], y[:500], test_fraction=0.2)
    assert result.n_test == 100 and result.n_train == 400
    assert len(set(result.test_index)) == 100 and len(result.test_predictions) == 100


def test_same_seed_gives_same_numbers(digits):
    X, y = digits
    a, b = linear_probe_cv(X[:600], y[:600], seed=4), linear_probe_cv(X[:600], y[:600], seed=4)
    pd.testing.assert_frame_equal(a.fold_scores, b.fold_scores)
    assert a.test_accuracy == b.test_accuracy
    np.testing.assert_array_equal(a.test_predictions, b.test_predictions)


def test_different_seed_changes_the_hold_out(digits):
    X, y = digits
    a, b = linear_probe_cv(X[:600], y[:600], seed=0), linear_probe_cv(X[:600], y[:600], seed=1)
    assert set(a.test_index) != set(b.test_index)


def test_probe_matches_a_hand_written_fold_loop():
    # noisy, unequally scaled features with weak signal: both the scaling and C change predictions
    rng = np.random.default_rng(1)
    X = rng.normal(size=(400, 30)) * rng.uniform(0.1, 50, size=30)
    y = (X[:, 0] / X[:, 0].std() + rng.normal(size=400) > 0).astype(int) + 2 * (rng.random(400) < 0.3)
    X_train, y_train, X_test, y_test = X[:300], y[:300], X[300:], y[300:]
    folds = np.arange(300) % 3
    result = probe_on_split(X_train, y_train, X_test, y_test, folds=folds)

    accs, f1s = [], []
    for fold in range(3):
        fit, val = folds != fold, folds == fold
        pred = reference_fit_predict(X_train[fit], y_train[fit], X_train[val])
        accs.append(sum(p == t for p, t in zip(pred, y_train[val])) / val.sum())
        f1s.append(reference_macro_f1(list(y_train[val]), list(pred)))
    assert list(result.fold_scores["accuracy"]) == pytest.approx(accs)
    assert list(result.fold_scores["macro_f1"]) == pytest.approx(f1s)
    assert result.cv_accuracy_mean == pytest.approx(np.mean(accs))
    assert result.cv_accuracy_std == pytest.approx(np.std(accs))
    assert list(result.fold_scores["n_fit"]) == [int((folds != f).sum()) for f in range(3)]
    test_pred = reference_fit_predict(X_train, y_train, X_test)
    np.testing.assert_array_equal(result.test_predictions, test_pred)
    assert result.test_macro_f1 == pytest.approx(reference_macro_f1(list(y_test), list(test_pred)))


def test_probe_uses_the_folds_of_a_shared_split(digits):
    X, y = digits
    frame = pd.DataFrame({"image_id": np.arange(400), "digit": y[:400]})
    split = make_split(frame, label_column="digit", n_folds=4).assignments
    train, test = split[split["split"] == "train"], split[split["split"] == "test"]
    result = probe_on_split(
        X[train["image_id"]], y[train["image_id"]], X[test["image_id"]], y[test["image_id"]],
        folds=train["fold"].to_numpy(dtype=int),
    )
    assert list(result.fold_scores["fold"]) == [0, 1, 2, 3]
    assert list(result.fold_scores["n_val"]) == list(train["fold"].value_counts().sort_index())
    assert result.n_test == len(test) and result.test_accuracy > 0.85


def test_single_member_classes_are_skipped_with_reason(digits):
    X, y = digits
    X = np.vstack([X[:300], X[300:301]])
    y = np.concatenate([y[:300], [99]])
    result = linear_probe_cv(X, y)
    assert result.skipped.to_dict("records") == [{"label": 99, "n": 1, "reason": "single_image_class"}]
    assert 300 not in set(result.test_index) and result.n_train + result.n_test == 300


def test_single_class_is_rejected():
    X = np.random.default_rng(0).normal(size=(20, 3))
    with pytest.raises(EvaluationError, match="single class"):
        probe_on_split(X[:15], np.zeros(15, int), X[15:], np.zeros(5, int))


def test_convergence_warnings_are_recorded_not_raised(recwarn):
    # near-duplicate points with opposite labels: liblinear runs out of iterations
    rng = np.random.default_rng(0)
    base = rng.normal(size=(10, 100))
    X = np.vstack([base, base + 1e-3 * rng.normal(size=base.shape)])
    y = np.r_[np.zeros(10, int), np.ones(10, int)]
    result = probe_on_split(X, y, X, y, n_folds=2)
    assert any("converge" in w for w in result.warnings)
    assert not [w for w in recwarn if "converge" in str(w.message)]


def test_metrics_frame_has_cv_mean_and_std(digits):
    X, y = digits
    result = linear_probe_cv(X[:400], y[:400])
    frame = result.metrics_frame().set_index("metric")
    assert frame.loc["cv_accuracy", "value"] == result.cv_accuracy_mean
    assert frame.loc["cv_accuracy", "std"] == result.cv_accuracy_std
    assert frame.loc["test_macro_f1", "n"] == result.n_test


def test_mismatched_feature_counts_are_rejected():
    X = np.ones((10, 3))
    with pytest.raises(EvaluationError, match="features"):
        probe_on_split(X, np.arange(10) % 2, np.ones((4, 2)), np.arange(4) % 2)


def test_nan_features_are_rejected():
    X = np.random.default_rng(0).normal(size=(20, 3))
    X[4, 1] = np.nan
    with pytest.raises(EvaluationError, match="NaN"):
        linear_probe_cv(X, np.arange(20) % 2)
