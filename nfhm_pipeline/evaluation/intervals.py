"""95 % intervals for the metric rows a stage writes, from its own per-image predictions.

For every (task, level, grp, rule) with predictions, the test images' correctness is resampled
with :func:`~nfhm_pipeline.evaluation.confidence.resample_counts` (the dataset's seed, so every
model of a dataset gets the same resamples: paired), by leakage unit when the split is grouped
(frames of one video, images of one patient move together: resampling images would understate the
uncertainty). From the same counts:

* top-1 accuracy of the rule (metric = the rule's name, or ``test_accuracy`` for a probe);
* zero-shot top-k and retrieval P@K / R@K (``EvalTables.item_scores``: each metric is a mean of
  per-item scores, so a resample is one weighted mean). Image queries are resampled like the
  other metrics (the same counts: paired across models); text→image queries, one per class, are
  resampled among themselves;
* balanced accuracy (``balanced_accuracy_<rule>``) and macro-F1 (``macro_f1_<rule>`` /
  ``test_macro_f1``), each a matrix product with class indicator matrices, so B resamples cost a
  few products, not B Python calls.

A "no prediction" (NULL predicted label: a zero vector) counts as wrong, as in the point estimate.
Per-class recall gets a Wilson interval (closed form) in ``per_class_metrics``. Intervals are
percentile intervals of the bootstrap distribution (``ci_method = 'bootstrap-paired'``); the
probes' CV scores keep mean ± std over folds as their range (``ci_method = 'cv-std'``).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from nfhm_pipeline.evaluation import names

DEFAULT_RESAMPLES = 1000
METHOD = "bootstrap-paired"


def _metric_names(task: str, rule: str) -> dict[str, str] | None:
    """statistic → metric name of the rows computed from ``rule``'s predictions."""
    if task == names.KNN:
        return {"accuracy": rule, "balanced": f"balanced_accuracy_{rule}", "macro_f1": f"macro_f1_{rule}"}
    if task in (names.LINEAR_PROBE, names.LOGISTIC_PROBE):
        return {"accuracy": "test_accuracy", "macro_f1": "test_macro_f1"}
    return None


def resampled_scores(true: np.ndarray, predicted: np.ndarray, counts: np.ndarray) -> dict[str, np.ndarray]:
    """[B] resampled accuracy, balanced accuracy and macro-F1 of one prediction set.

    ``true`` [n] labels (strings), ``predicted`` [n] (None/NaN: no prediction), ``counts`` int [B, n].
    Macro-F1 averages over the classes present in the resample's true or predicted labels (as
    scikit-learn does); balanced accuracy over the classes present in its true labels.
    """
    true = np.asarray(true, dtype=object)
    predicted = np.asarray(predicted, dtype=object)
    has = pd.notna(predicted)
    correct = has & (predicted == true)
    weights = counts.astype(np.float64)
    total = weights.sum(axis=1)
    out = {"accuracy": weights @ correct.astype(np.float64) / total}
    classes = np.unique(np.concatenate([true, predicted[has]]).astype(str))
    index = {c: i for i, c in enumerate(classes)}
    t = np.array([index[str(v)] for v in true])
    p = np.array([index[str(v)] if h else -1 for v, h in zip(predicted, has)])
    k = len(classes)
    true_onehot = np.zeros((len(t), k))
    true_onehot[np.arange(len(t)), t] = 1.0
    pred_onehot = np.zeros((len(t), k))
    pred_onehot[np.flatnonzero(p >= 0), p[p >= 0]] = 1.0
    support = weights @ true_onehot  # [B, k]
    predicted_count = weights @ pred_onehot
    hits = weights @ (true_onehot * correct[:, None])
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, hits / support, np.nan)
        out["balanced"] = np.nanmean(recall, axis=1)
        denominator = support + predicted_count
        f1 = np.where(denominator > 0, 2 * hits / denominator, np.nan)
        out["macro_f1"] = np.nanmean(f1, axis=1)
    return out


def add_intervals(tables, frame: pd.DataFrame, *, seed: int, n_resamples: int = DEFAULT_RESAMPLES,
                  units: pd.Series | None = None, level: float = 0.95) -> None:
    """Fill ``ci_low`` / ``ci_high`` / ``ci_method`` of ``tables``' metric rows that come from its
    predictions, and the Wilson recall interval of its per-class rows (in place).

    ``frame``: the evaluation frame (image_id per row); ``units``: image_id → resample unit (the
    leakage unit of a grouped split), or None to resample images.
    """
    from nfhm_pipeline.evaluation.confidence import percentile_interval, resample_counts, wilson_interval

    metrics, per_class, _ = tables.frames(predictions=False)
    blocks = tables.prediction_groups()  # one prediction block at a time, never all of them in one frame
    item_scores = getattr(tables, "item_scores", [])
    if len(metrics):
        metrics = metrics.assign(ci_low=np.nan, ci_high=np.nan, ci_method=None)
        where = {(r.task, r.level, r.grp, r.metric): i for i, r in enumerate(metrics.itertuples())}
        counts_of: dict[tuple, np.ndarray] = {}

        def counts_for(lvl, grp, ids: np.ndarray, images: bool) -> np.ndarray:
            key = (lvl, grp, images, tuple(ids))
            if key not in counts_of:  # the same test items: the same resamples for every metric
                groups = units.reindex(ids).astype(str).to_numpy() if images and units is not None else None
                counts_of[key] = resample_counts(len(ids), n_resamples, seed, groups=groups)
            return counts_of[key]

        low = metrics["ci_low"].to_numpy(copy=True)
        high = metrics["ci_high"].to_numpy(copy=True)
        method = metrics["ci_method"].to_numpy(copy=True)
        for (task, lvl, grp, rule), rows in blocks:
            wanted = _metric_names(task, rule)
            if wanted is None or len(rows) == 0:
                continue
            ids = rows["image_id"].astype(str).to_numpy()
            scores = resampled_scores(rows["true_label"].to_numpy(), rows["predicted_label"].to_numpy(),
                                      counts_for(lvl, grp, ids, True))
            for statistic, metric in wanted.items():
                i = where.get((task, lvl, grp, metric))
                if i is None:
                    continue
                lo, hi = percentile_interval(scores[statistic][:, None], level)
                low[i], high[i], method[i] = float(lo[0]), float(hi[0]), METHOD
        metrics = metrics.assign(ci_low=low, ci_high=high, ci_method=method)
        if item_scores:  # zero-shot hits, retrieval P@K / R@K per query: the metric is their mean
            low = metrics["ci_low"].to_numpy(copy=True)
            high = metrics["ci_high"].to_numpy(copy=True)
            method = metrics["ci_method"].to_numpy(copy=True)
            for item in item_scores:
                i = where.get((item.task, item.level, item.grp, item.metric))
                if i is None or len(item.ids) == 0:
                    continue
                counts = counts_for(item.level, item.grp, np.asarray(item.ids).astype(str), item.images)
                weights = counts.astype(np.float64)
                resampled = weights @ np.asarray(item.scores, dtype=np.float64) / weights.sum(axis=1)
                lo, hi = percentile_interval(resampled[:, None], level)
                low[i], high[i], method[i] = float(lo[0]), float(hi[0]), METHOD
            metrics = metrics.assign(ci_low=low, ci_high=high, ci_method=method)
        # Cross-validation scores keep the seed's mean ± std over folds (a spread, not a 95 % interval).
        cv = metrics["metric"].astype(str).str.startswith("cv_").to_numpy() & metrics["std"].notna().to_numpy()
        if cv.any():
            metrics.loc[cv, "ci_low"] = metrics.loc[cv, "value"] - metrics.loc[cv, "std"]
            metrics.loc[cv, "ci_high"] = metrics.loc[cv, "value"] + metrics.loc[cv, "std"]
            metrics.loc[cv, "ci_method"] = "cv-std"
        tables.metrics = [metrics]
    if len(per_class) and {"support", "recall"} <= set(per_class.columns):
        n = per_class["support"].fillna(0).to_numpy(dtype=np.float64)
        k = np.round(per_class["recall"].fillna(0).to_numpy(dtype=np.float64) * n)
        lo, hi = wilson_interval(k, n, level)
        tables.per_class = [per_class.assign(recall_ci_low=lo, recall_ci_high=hi)]


DIFFERENCE_COLUMNS = ["task", "level", "grp", "metric", "model_a", "model_b", "difference", "ci_low", "ci_high",
                      "p_value", "p_holm", "test", "p_mcnemar", "n"]


def model_differences(predictions: pd.DataFrame, *, seed: int, n_resamples: int = DEFAULT_RESAMPLES,
                      units: pd.Series | None = None, level: float = 0.95) -> pd.DataFrame:
    """Every model against the best one, per (task, level, grp, rule), on the test images all of
    them predicted (one shared split: the comparison is paired).

    ``predictions``: rows of table ``predictions`` of one dataset (several models). Returns one row
    per (best, other) pair: ``difference`` = accuracy(best) − accuracy(other), its percentile
    bootstrap CI and two-sided p-value from the same resamples for every model, the Holm-adjusted
    p over the others (``p_holm``: a model with ``p_holm >= 0.05`` is statistically tied with the
    best), and the exact McNemar p on the discordant images as a cross-check.
    """
    from nfhm_pipeline.evaluation.confidence import holm, mcnemar_exact, paired_differences, resample_counts

    rows = []
    if predictions.empty:
        return pd.DataFrame(columns=DIFFERENCE_COLUMNS)
    for (task, lvl, grp, rule), part in predictions.groupby(["task", "level", "grp", "rule"], sort=True):
        wanted = _metric_names(task, rule)
        if wanted is None:
            continue
        part = part.assign(correct=part["predicted_label"].notna() & (part["predicted_label"] == part["true_label"]))
        wide = part.pivot_table(index="image_id", columns="model", values="correct", aggfunc="first")
        wide = wide.dropna()  # images every model predicted
        if wide.shape[1] < 2 or len(wide) == 0:
            continue
        models = list(wide.columns)
        correct = wide.to_numpy(dtype=bool)
        accuracy = correct.mean(axis=0)
        best = int(np.argmax(accuracy))  # ties: the model whose name sorts first
        ids = wide.index.astype(str).to_numpy()
        groups = units.reindex(ids).astype(str).to_numpy() if units is not None else None
        counts = resample_counts(len(ids), n_resamples, seed, groups=groups)
        differences = paired_differences(correct, best, counts, level=level)
        adjusted = holm(np.array([d.p_value for d in differences]))
        for d, p_holm in zip(differences, adjusted):
            rows.append({"task": task, "level": lvl, "grp": grp, "metric": wanted["accuracy"],
                         "model_a": models[d.model_a], "model_b": models[d.model_b], "difference": d.difference,
                         "ci_low": d.low, "ci_high": d.high, "p_value": d.p_value, "p_holm": float(p_holm),
                         "test": d.test, "p_mcnemar": mcnemar_exact(correct[:, d.model_a], correct[:, d.model_b]),
                         "n": int(d.n)})
    return pd.DataFrame(rows, columns=DIFFERENCE_COLUMNS)
