"""Scores of predicted labels against true labels (plain numpy / pandas / scikit-learn).

Conventions (scikit-learn's, with ``zero_division=0``):

* ``accuracy``: fraction of rows with the right label.
* ``balanced_accuracy``: mean recall over the classes present in ``y_true``.
* ``macro_f1``: unweighted mean F1 over the classes present in ``y_true`` OR ``y_pred`` (a class
  only ever predicted scores F1 = 0 and pulls the mean down); undefined precision counts as 0.

A predicted label of ``None`` (or NaN) is "no prediction" (e.g. an all-zero embedding, whose cosine
is undefined): the row counts as wrong (a miss for its true class) and is not a class of its own,
so it lowers accuracy and recall but never adds a class to the macro means.
"""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from nfhm_pipeline.errors import EvaluationError


def _pair(y_true, y_pred) -> tuple[np.ndarray, np.ndarray]:
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.ndim != 1 or y_true.shape != y_pred.shape:
        raise EvaluationError(
            f"y_true {y_true.shape} and y_pred {y_pred.shape} must be 1-D and of one length, one label per test row."
        )
    if y_true.size == 0:
        raise EvaluationError("no test rows to score: y_true and y_pred are empty.")
    return y_true, y_pred


def _no_prediction(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[np.ndarray, list | None]:
    """``y_pred`` with "no prediction" (None/NaN) replaced by a label no true or predicted row has,
    and the labels to average over (None: every label present, as when nothing is missing)."""
    missing = pd.isna(y_pred) if y_pred.dtype == object else np.zeros(y_pred.shape, bool)
    if not missing.any():
        return y_pred, None
    present = set(y_true.tolist()) | set(y_pred[~missing].tolist())
    if all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in present):
        sentinel = min(present) - 1  # scikit-learn refuses labels mixing numbers and strings
    else:
        sentinel = "\x00no prediction"
        while sentinel in present:
            sentinel += "\x00"
    filled = np.empty(y_pred.shape, dtype=object)
    filled[:] = y_pred
    filled[missing] = sentinel
    return filled, sorted(present, key=str) if isinstance(sentinel, str) else sorted(present)


def summarize_predictions(y_true, y_pred) -> dict:
    """{"accuracy", "balanced_accuracy", "macro_f1": float in [0, 1], "n": int rows}."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    y_true, y_pred = _pair(y_true, y_pred)
    y_pred, labels = _no_prediction(y_true, y_pred)
    if labels is not None:
        y_true = y_true.astype(object)
    with warnings.catch_warnings():
        # "y_pred contains classes not in y_true" is expected for a nearest-neighbour rule (and for
        # the no-prediction stand-in, whose recall is undefined and so left out of the mean)
        warnings.simplefilter("ignore", UserWarning)
        balanced = balanced_accuracy_score(y_true, y_pred)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "n": int(y_true.size),
    }


def topk_accuracy(y_true_idx, ranking, k: int) -> float:
    """Fraction of rows whose true class index is among the first k columns of ``ranking``.

    ``y_true_idx``: int [n] (-1, e.g. a class with no train row, always counts as a miss);
    ``ranking``: int [n, m] class indices best first; a negative entry is "no prediction" and never
    a hit (a row of them: a test image that got no ranking). k >= 1 is clipped to m, so a ranking
    of all classes gives 1.0 for any k >= m when every true class is known.
    """
    y_true_idx, ranking = np.asarray(y_true_idx), np.asarray(ranking)
    if k < 1:
        raise EvaluationError(f"k must be >= 1, got {k}.")
    if ranking.ndim != 2 or ranking.shape[0] != y_true_idx.shape[0] or y_true_idx.ndim != 1:
        raise EvaluationError(f"ranking {ranking.shape} must be [n, m] for y_true_idx of shape {y_true_idx.shape}.")
    if y_true_idx.size == 0:
        raise EvaluationError("no test rows to score: y_true_idx is empty.")
    top = ranking[:, :k]
    return float(((top == y_true_idx[:, None]) & (top >= 0)).any(axis=1).mean())


def per_class_report(y_true, y_pred) -> pd.DataFrame:
    """One row per class present in ``y_true`` (sorted): class, support (true rows), precision,
    recall, f1 (0 where undefined)."""
    from sklearn.metrics import precision_recall_fscore_support

    y_true, y_pred = _pair(y_true, y_pred)
    y_pred, labels = _no_prediction(y_true, y_pred)
    if labels is not None:
        y_true = y_true.astype(object)
    classes = np.unique(y_true)
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=classes, zero_division=0)
    return pd.DataFrame({"class": classes, "support": support, "precision": precision, "recall": recall, "f1": f1})


def confusion_pairs(y_true, y_pred, top: int = 10) -> pd.DataFrame:
    """The ``top`` most frequent mistakes: columns true, predicted, count (int); count descending,
    then true and predicted label order. Correct predictions are not listed."""
    y_true, y_pred = _pair(y_true, y_pred)
    wrong = y_true != y_pred
    frame = pd.DataFrame({"true": y_true[wrong], "predicted": y_pred[wrong]})
    counts = frame.groupby(["true", "predicted"]).size().rename("count").reset_index()
    counts = counts.sort_values(["count", "true", "predicted"], ascending=[False, True, True], kind="stable")
    return counts.head(top).reset_index(drop=True)

