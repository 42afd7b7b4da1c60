"""Prediction scores checked against plainly written loops."""
from collections import Counter

import numpy as np
import pytest

from nfhm_pipeline.errors import EvaluationError
from nfhm_pipeline.evaluation.classification import (
    confusion_pairs,
    per_class_report,
    summarize_predictions,
    topk_accuracy,
)


def random_labels(seed, n=80):
    rng = np.random.default_rng(seed)
    y_true = rng.choice(["ant", "bee", "cow", "doe", "eel"], n, p=[0.4, 0.3, 0.2, 0.09, 0.01])
    # "fox" is only ever predicted, never true; "eel" is rare and may never be predicted
    y_pred = np.where(rng.random(n) < 0.6, y_true, rng.choice(["ant", "bee", "cow", "fox"], n))
    return y_true, y_pred


def precision_recall_f1(y_true, y_pred, c):
    tp = sum(t == c and p == c for t, p in zip(y_true, y_pred))
    predicted = sum(p == c for p in y_pred)
    actual = sum(t == c for t in y_true)
    precision = tp / predicted if predicted else 0.0
    recall = tp / actual if actual else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1, actual


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_summary_matches_loops(seed):
    y_true, y_pred = random_labels(seed)
    true_classes = sorted(set(y_true))
    all_classes = sorted(set(y_true) | set(y_pred))
    summary = summarize_predictions(y_true, y_pred)
    assert summary["n"] == len(y_true)
    assert summary["accuracy"] == pytest.approx(sum(t == p for t, p in zip(y_true, y_pred)) / len(y_true))
    recalls = [precision_recall_f1(y_true, y_pred, c)[1] for c in true_classes]
    assert summary["balanced_accuracy"] == pytest.approx(sum(recalls) / len(recalls))
    f1s = [precision_recall_f1(y_true, y_pred, c)[2] for c in all_classes]
    assert summary["macro_f1"] == pytest.approx(sum(f1s) / len(f1s))


def test_perfect_predictions_score_one_everywhere():
    y = np.array([3, 1, 1, 2])
    assert summarize_predictions(y, y) == {"accuracy": 1.0, "balanced_accuracy": 1.0, "macro_f1": 1.0, "n": 4}


def test_topk_accuracy_matches_loop_and_counts_unknown_class_as_miss():
    rng = np.random.default_rng(3)
    ranking = np.array([rng.permutation(6)[:4] for _ in range(50)])
    y_true_idx = rng.integers(-1, 6, 50)
    for k in (1, 2, 4):
        hits = sum(int(y in list(row[:k])) for y, row in zip(y_true_idx, ranking))
        assert topk_accuracy(y_true_idx, ranking, k) == pytest.approx(hits / 50)


def test_topk_accuracy_clips_k_to_the_ranking_width():
    ranking = np.array([[2, 0, 1], [1, 2, 0]])
    assert topk_accuracy([0, 0], ranking, 10) == 1.0
    assert topk_accuracy([0, 0], ranking, 10) == topk_accuracy([0, 0], ranking, 3)


def test_topk_accuracy_refuses_k_below_one():
    with pytest.raises(EvaluationError, match="k must be >= 1"):
        topk_accuracy([0], [[0]], 0)


def test_per_class_report_matches_loops_for_classes_present_in_y_true():
    y_true, y_pred = random_labels(4)
    report = per_class_report(y_true, y_pred)
    assert list(report.columns) == ["class", "support", "precision", "recall", "f1"]
    assert list(report["class"]) == sorted(set(y_true))
    for row in report.itertuples():
        precision, recall, f1, support = precision_recall_f1(y_true, y_pred, row._1)
        assert (row.support, row.precision, row.recall, row.f1) == pytest.approx((support, precision, recall, f1))


def test_confusion_pairs_lists_most_frequent_mistakes_first_and_omits_hits():
    y_true, y_pred = random_labels(5, n=200)
    expected = Counter((t, p) for t, p in zip(y_true, y_pred) if t != p)
    expected = sorted(expected.items(), key=lambda item: (-item[1], item[0][0], item[0][1]))[:4]
    pairs = confusion_pairs(y_true, y_pred, top=4)
    assert list(pairs.columns) == ["true", "predicted", "count"]
    assert [((r.true, r.predicted), r.count) for r in pairs.itertuples()] == expected


def test_confusion_pairs_of_perfect_predictions_is_empty():
    assert confusion_pairs(["a", "b"], ["a", "b"]).empty


@pytest.mark.parametrize(
    "y_true, y_pred, message",
    [([], [], "no test rows"), (["a", "b"], ["a"], "one length")],
)
def test_unusable_label_arrays_raise_evaluation_error(y_true, y_pred, message):
    for fn in (summarize_predictions, per_class_report, confusion_pairs):
        with pytest.raises(EvaluationError, match=message):
            fn(y_true, y_pred)
