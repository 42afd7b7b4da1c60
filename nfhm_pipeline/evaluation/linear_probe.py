"""Linear probes on frozen embeddings (protocol of the medical-VLM poster, seed 001).

Features are standardised by a ``StandardScaler`` fit on the rows the classifier is fit on (one
``Pipeline`` per fit, so a validation or test row never leaks into the scaling). Classifiers:

* ``linear_svc``: ``LinearSVC(C = 100 / N)`` where N is the number of samples that particular
  SVC is fit on (the training folds during CV, all non-test rows for the final refit).
* ``logistic``: ``LogisticRegression(C=1.0, max_iter=1000)``.

Scores: accuracy and macro-F1 (unweighted mean of per-class F1 over the labels present in the
true or predicted labels, zero when undefined) as mean ± std (population std, ddof=0) over the CV
folds, each fold model scored on its own validation fold, plus the score on the held-out test
rows of a model refit on all training rows.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import pandas as pd

from nfhm_pipeline.errors import EvaluationError
from nfhm_pipeline.evaluation.names import PROBE_METRICS
from nfhm_pipeline.evaluation.splits import assign_cv_folds, make_split

Classifier = Literal["linear_svc", "logistic"]


@dataclass(frozen=True)
class ProbeResult:
    """Scores of one linear probe.

    ``fold_scores``: one row per CV fold (fold, n_fit, n_val, accuracy, macro_f1).
    ``test_predictions``: predicted label per test row, in the order of the test rows given
    (for ``linear_probe_cv``: the rows ``test_index`` of X). ``skipped``: classes left out
    (label, n, reason). ``warnings``: convergence warnings met while fitting, prefixed by the fit.
    """

    classifier: str
    cv_accuracy_mean: float
    cv_accuracy_std: float
    cv_macro_f1_mean: float
    cv_macro_f1_std: float
    test_accuracy: float
    test_macro_f1: float
    n_train: int
    n_test: int
    fold_scores: pd.DataFrame
    test_predictions: np.ndarray
    test_index: np.ndarray | None = None
    skipped: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["label", "n", "reason"]))
    warnings: list = field(default_factory=list)

    def metrics_frame(self) -> pd.DataFrame:
        """Long table (metric, value, std, n) matching the warehouse ``metrics`` columns."""
        return pd.DataFrame(
            {
                "metric": list(PROBE_METRICS),  # cv_accuracy, cv_macro_f1, test_accuracy, test_macro_f1
                "value": [self.cv_accuracy_mean, self.cv_macro_f1_mean, self.test_accuracy, self.test_macro_f1],
                "std": [self.cv_accuracy_std, self.cv_macro_f1_std, np.nan, np.nan],
                "n": [self.n_train, self.n_train, self.n_test, self.n_test],
            }
        )


def linear_probe_cv(
    X: np.ndarray,
    y: np.ndarray,
    *,
    classifier: Classifier = "linear_svc",
    test_fraction: float = 0.2,
    n_folds: int = 5,
    seed: int = 0,
) -> ProbeResult:
    """Hold out a stratified ``test_fraction`` of (X [N, D], y [N]), cross-validate on the rest
    with ``n_folds`` stratified folds and score a refit model on the held-out rows.

    The hold-out and the folds come from ``make_split`` (rows identified by their position), so
    classes with a single member are skipped and reported in ``result.skipped``.
    """
    X, y = _checked(X, y, "X")
    frame = pd.DataFrame({"image_id": np.arange(len(y)), "label": y})
    split = make_split(frame, label_column="label", test_fraction=test_fraction, seed=seed, n_folds=n_folds)
    a = split.assignments
    train = a.loc[a["split"] == "train"]
    test_idx = a.loc[a["split"] == "test", "image_id"].to_numpy()
    train_idx = train["image_id"].to_numpy()
    result = probe_on_split(
        X[train_idx], y[train_idx], X[test_idx], y[test_idx],
        folds=train["fold"].to_numpy(dtype=np.int64), classifier=classifier, seed=seed,
    )
    skipped = split.dropped.groupby("label", sort=True).size().rename("n").reset_index()
    skipped["reason"] = "single_image_class"
    return replace(result, test_index=test_idx, skipped=skipped)


def probe_on_split(
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_test: np.ndarray,
    y_test: np.ndarray,
    *,
    folds: np.ndarray | None = None,
    classifier: Classifier = "linear_svc",
    n_folds: int = 5,
    seed: int = 0,
) -> ProbeResult:
    """Probe on a given split: CV over ``folds`` (fold id per train row, e.g. from
    ``make_split``; computed by ``assign_cv_folds(y_train, n_folds, seed)`` when None), then refit
    on all train rows and score X_test. Predictions are labels of the same kind as ``y_train``.
    """
    if classifier not in ("linear_svc", "logistic"):
        raise EvaluationError(f"classifier must be 'linear_svc' or 'logistic', got {classifier!r}.")
    X_train, y_train = _checked(X_train, y_train, "X_train")
    X_test, y_test = _checked(X_test, y_test, "X_test")
    if X_train.shape[1] != X_test.shape[1]:
        raise EvaluationError(f"X_train has {X_train.shape[1]} features but X_test has {X_test.shape[1]}.")
    if len(np.unique(y_train)) < 2:
        raise EvaluationError(f"The training rows hold a single class ({y_train[0]!r}); a probe needs at least 2.")
    if folds is None:
        folds = assign_cv_folds(y_train, n_folds=n_folds, seed=seed)[0]
    folds = np.asarray(folds)
    if folds.shape != y_train.shape:
        raise EvaluationError(f"folds has shape {folds.shape}, expected one fold id per train row {y_train.shape}.")

    notes: list[str] = []
    rows = []
    for fold in np.unique(folds):
        fit, val = folds != fold, folds == fold
        if len(np.unique(y_train[fit])) < 2:
            notes.append(f"fold {fold}: skipped, its training part holds a single class")
            continue
        pred = _fit_predict(X_train[fit], y_train[fit], X_train[val], classifier, seed, notes, f"fold {fold}")
        rows.append((int(fold), int(fit.sum()), int(val.sum()), *_scores(y_train[val], pred)))
    if not rows:
        raise EvaluationError("No CV fold could be fit: every fold's training part holds a single class.")
    fold_scores = pd.DataFrame(rows, columns=["fold", "n_fit", "n_val", "accuracy", "macro_f1"])
    pred = _fit_predict(X_train, y_train, X_test, classifier, seed, notes, "refit")
    test_acc, test_f1 = _scores(y_test, pred)
    return ProbeResult(
        classifier=classifier,
        cv_accuracy_mean=float(fold_scores["accuracy"].mean()),
        cv_accuracy_std=float(fold_scores["accuracy"].std(ddof=0)),
        cv_macro_f1_mean=float(fold_scores["macro_f1"].mean()),
        cv_macro_f1_std=float(fold_scores["macro_f1"].std(ddof=0)),
        test_accuracy=test_acc,
        test_macro_f1=test_f1,
        n_train=len(y_train),
        n_test=len(y_test),
        fold_scores=fold_scores,
        test_predictions=pred,
        warnings=notes,
    )


def build_probe(classifier: Classifier, n_fit: int, seed: int = 0):
    """The unfitted sklearn Pipeline (scaler + classifier) for a fit on ``n_fit`` rows."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    if classifier == "linear_svc":
        model = LinearSVC(C=100.0 / n_fit, random_state=seed)
    else:
        model = LogisticRegression(C=1.0, max_iter=1000)
    return make_pipeline(StandardScaler(), model)


# --- helpers -------------------------------------------------------------------------------------


def _fit_predict(X_fit, y_fit, X_eval, classifier, seed, notes: list[str], where: str) -> np.ndarray:
    from sklearn.exceptions import ConvergenceWarning

    model = build_probe(classifier, len(y_fit), seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(X_fit, y_fit)
    for w in caught:
        if issubclass(w.category, ConvergenceWarning):
            notes.append(f"{where}: {w.message}")
        else:  # only convergence is expected; anything else stays visible
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return model.predict(X_eval)


def _scores(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[float, float]:
    from sklearn.metrics import f1_score

    return float(np.mean(y_true == y_pred)), float(f1_score(y_true, y_pred, average="macro", zero_division=0))


def _checked(X, y, name: str) -> tuple[np.ndarray, np.ndarray]:
    X, y = np.asarray(X, dtype=np.float64), np.asarray(y)
    if X.ndim != 2 or X.shape[0] == 0:
        raise EvaluationError(f"{name} must be a non-empty 2-D array [rows, features], got shape {X.shape}.")
    if y.shape != (X.shape[0],):
        raise EvaluationError(f"{name} has {X.shape[0]} rows but its labels have shape {y.shape}.")
    if not np.isfinite(X).all():
        raise EvaluationError(f"{name} holds {int((~np.isfinite(X)).any(axis=1).sum())} row(s) with NaN or inf.")
    if pd.isna(y).any():
        raise EvaluationError(f"{int(pd.isna(y).sum())} label(s) for {name} are missing (NaN/None).")
    return X, y

