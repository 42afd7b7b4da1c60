"""Paired DeLong comparisons of ROC AUCs on the same test images, from the stored per-image scores.

The AUC stages (``multilabel_metrics``, ``alignment_head``) store, besides the AUCs, every counted
(test image, label) entry they ranked: table ``auc_scores`` (``score_rows``), one row per entry with
its target (0/1) and score. A label's entries are those its AUC counts (the uncertain-label policy's
mask) with a finite score, so a label a probe skipped has none. ``model_comparison`` turns them into
``model_differences`` rows with ``test = 'delong'`` (``delong_differences``):

* **between models** (tasks ``multilabel_probe`` and ``multilabel_zero_shot``): per (task, level,
  label), on the images every model of that task scored, every model a against every other model b:
  ``difference`` = AUC(a) - AUC(b);
* **alignment head against its base** (task ``alignment_head``): per (level, label), a model's
  alignment head against the same model's zero-shot AUC on the images both scored: ``model_a`` =
  ``model_b`` = the model, ``difference`` = AUC(head) - AUC(zero-shot).

Each row: DeLong's paired test (DeLong, DeLong and Clarke-Pearson 1988; midrank structural
components, ties count one half, as in ``evaluation.confidence``): var = var_a + var_b - 2 cov_ab,
the 95 % interval difference -/+ z sqrt(var) clipped to [-1, 1], the two-sided normal p-value, and
``p_holm``: Holm over the comparisons of one family (task, level, label, model_a), i.e. model_a
against each of the others. ``n`` is the number of images compared, ``grp`` ``all``, ``metric``
``auc:<label>``, ``p_mcnemar`` NULL. A label whose compared images hold one class gives no row;
with a single positive or negative the variance is undefined and p, p_holm and the interval are NaN.
Identical rankings (variance 0) give p = 1 when the difference is 0, else 0 (as
``confidence.delong_paired_test``).

Macro and micro AUC (metrics ``macro_auc`` and ``micro_auc``) get a **paired bootstrap over the test
images** instead (``bootstrap_summary_differences``, ``test = 'bootstrap-paired'``, the constant of
the other bootstrap rows): DeLong's per-label components do not give the covariance between labels
scored on the same images, a resample of whole images keeps it. The pairs are those above: every
model against every other per (task, level) for the cross-model tasks, and each alignment head
against its model's zero-shot per level; ``grp`` ``all``, ``p_mcnemar`` NULL.

* **Images**: those every compared scorer has an ``auc_scores`` entry for (sorted by image_id),
  ``n`` their number. Each scorer keeps its own entries on them, so when the scorers counted the
  same entries (one split, one uncertain-label policy: the usual case) the point values are the
  stored ``macro_auc`` / ``micro_auc`` metric values exactly (``auc_summary``): macro = mean of the
  AUCs of the labels whose entries hold both classes (a label with one class is left out, as in
  the metric; a label a probe skipped has no entries), micro = one AUC over every entry pooled.
* **Resamples**: ``confidence.resample_counts(n, B, seed, groups=...)`` over those sorted images, B
  the dataset's ``resamples`` and the stage seed, so both sides of a pair see the same resampled
  test set; with a resample unit (``stages.base.resample_units``: the leakage unit of a grouped
  split, or ``resample_by``) whole units are drawn. An image drawn k times counts k times in every
  label's AUC. A resample's macro is the mean over the labels with both classes in it; a resample
  in which either side's value is undefined (micro with one class) is left out of the interval and
  p-value.
* **Row**: ``difference`` = value(a) - value(b) on the full sample; ``ci_low`` / ``ci_high`` the
  percentile interval of the resampled differences (``confidence.percentile_interval``); ``p_value``
  the two-sided bootstrap p of ``confidence.paired_differences``, min(1, 2 min(#{d* <= 0} + 1,
  #{d* >= 0} + 1) / (B + 1)), so an identical copy gets p = 1 and no p is 0; ``p_holm``: Holm over
  the family (task, level, metric, model_a), as for DeLong. A pair where either value is undefined
  on the full sample gives no row.

Each resample's AUC is a weighted Mann-Whitney statistic computed from ranks: the entries of a label
are sorted once by score, and one cumulative sum of the resampled negative weights per block of
resamples gives, for every positive entry, the weight of negatives below it and tied with it (ties
count one half), so B resamples cost a few [B, entries] array operations, not B calls.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from nfhm_pipeline.errors import EvaluationError
from nfhm_pipeline.evaluation.intervals import DEFAULT_RESAMPLES, DIFFERENCE_COLUMNS
from nfhm_pipeline.evaluation.intervals import METHOD as BOOTSTRAP_TEST
from nfhm_pipeline.evaluation.names import (ALIGNMENT_HEAD, AUC, MACRO_AUC, MICRO_AUC, MULTILABEL_PROBE,
                                           MULTILABEL_ZERO_SHOT, label_metric)

DELONG_TEST = "delong"
SUMMARY_METRICS = (MACRO_AUC, MICRO_AUC)  # tested by the paired bootstrap (BOOTSTRAP_TEST)
_CHUNK_ELEMENTS = 1 << 22  # resampled entry weights held at once (32 MB of float64)
# columns of the rows a stage hands to store_results (table auc_scores, without dataset/model/run/split)
SCORE_COLUMNS = ["task", "level", "finding", "image_id", "target", "score"]
# tasks compared model against model; ALIGNMENT_HEAD is compared with its model's zero-shot
CROSS_MODEL_TASKS = (MULTILABEL_PROBE, MULTILABEL_ZERO_SHOT)
AUC_TASKS = (*CROSS_MODEL_TASKS, ALIGNMENT_HEAD)  # the tasks whose rows this module writes


def score_rows(task: str, level: str, image_ids, names, y, mask, scores) -> pd.DataFrame:
    """The entries an AUC counts, as ``auc_scores`` rows (SCORE_COLUMNS): for label j, every image i
    with ``mask[i, j]`` and a finite ``scores[i, j]``, its ``target`` y[i, j] (int8) and ``score``.

    ``image_ids`` [N]; ``names`` [F]; ``y``, ``mask``, ``scores`` [N, F] (rows = ``image_ids``).
    Label by label, images in the given order.
    """
    image_ids = np.asarray(image_ids).astype(str)
    y, mask, scores = np.asarray(y), np.asarray(mask, dtype=bool), np.asarray(scores, dtype=np.float64)
    if not (y.shape == mask.shape == scores.shape == (len(image_ids), len(names))):
        raise EvaluationError(f"score_rows: {len(image_ids)} images and {len(names)} labels, but targets "
                              f"{y.shape}, mask {mask.shape} and scores {scores.shape}")
    counted = mask & np.isfinite(scores)
    label, image = np.nonzero(counted.T)  # label-major: one label's entries together
    return pd.DataFrame({
        "task": task, "level": level, "finding": np.asarray([str(n) for n in names], dtype=object)[label],
        "image_id": image_ids[image], "target": y[image, label].astype(np.int8),
        "score": scores[image, label]}, columns=SCORE_COLUMNS)


def delong_differences(scores: pd.DataFrame, level: float = 0.95) -> pd.DataFrame:
    """``model_differences`` rows (DIFFERENCE_COLUMNS, test ``delong``) from ``auc_scores`` rows of one
    dataset and split (columns model, task, level, finding, image_id, target, score; any other
    columns are ignored). See the module docstring for what is compared. Rows sorted by task,
    level, label, model_a, model_b.
    """
    missing = {"model", "task", "level", "finding", "image_id", "target", "score"} - set(scores.columns)
    if missing:
        raise EvaluationError(f"delong_differences needs auc_scores columns {sorted(missing)}")
    z = float(stats.norm.ppf(0.5 + level / 2))
    rows: list[dict] = []
    for (task, lvl, finding), part in scores.groupby(["task", "level", "finding"], sort=True):
        if task in CROSS_MODEL_TASKS:
            rows += _family_rows(part, task, lvl, finding, z, pair_with_self=False)
    heads = scores[scores["task"] == ALIGNMENT_HEAD]
    if len(heads):
        bases = scores[(scores["task"] == MULTILABEL_ZERO_SHOT) & scores["model"].isin(heads["model"].unique())]
        both = pd.concat([heads, bases], ignore_index=True)
        for (lvl, finding, model), part in both.groupby(["level", "finding", "model"], sort=True):
            rows += _family_rows(part, ALIGNMENT_HEAD, lvl, finding, z, pair_with_self=True)
    frame = pd.DataFrame(rows).reindex(columns=DIFFERENCE_COLUMNS)
    return frame.sort_values(["task", "level", "metric", "model_a", "model_b"], kind="stable").reset_index(drop=True)


def _family_rows(part: pd.DataFrame, task: str, level: str, finding: str, z: float, *,
                 pair_with_self: bool) -> list[dict]:
    """The rows of one (task, level, label): columns of the scorers are models (cross-model) or
    the two tasks of one model (``pair_with_self``: alignment head first, zero-shot second)."""
    from nfhm_pipeline.evaluation.confidence import holm

    column = "task" if pair_with_self else "model"
    if part.duplicated(["image_id", column]).any():
        raise EvaluationError(f"auc_scores holds an image twice for {task}/{level}/{finding}: the rows of "
                              "one model and task must come from one run (materialize it again)")
    wide = part.pivot(index="image_id", columns=column, values="score").dropna()  # images all scored
    if pair_with_self:
        if wide.shape[1] < 2:
            return []
        wide = wide[[ALIGNMENT_HEAD, MULTILABEL_ZERO_SHOT]]
    if wide.shape[1] < 2 or wide.empty:
        return []
    targets = part.pivot(index="image_id", columns=column, values="target").loc[wide.index, wide.columns]
    if (targets.nunique(axis=1) > 1).any():
        raise EvaluationError(f"the stored targets of {task}/{level}/{finding} disagree between "
                              f"{list(wide.columns)}: materialize their AUC stages again on the current split")
    y = targets.iloc[:, 0].to_numpy() == 1
    result = paired_delong(y, wide.to_numpy().T)
    if result is None:
        return []
    auc, cov = result
    names = list(wide.columns)
    model = str(part["model"].iloc[0])
    out = []
    for a in range(len(names)):
        if pair_with_self and a == 1:
            break
        family = []
        for b in range(len(names)):
            if b == a:
                continue
            diff = float(auc[a] - auc[b])
            var = float(cov[a, a] + cov[b, b] - 2 * cov[a, b])
            p, low, high = _normal_test(diff, var, z)
            family.append({
                "task": task, "level": level, "grp": "all", "metric": label_metric(AUC, finding),
                "model_a": model if pair_with_self else str(names[a]),
                "model_b": model if pair_with_self else str(names[b]),
                "difference": diff, "ci_low": low, "ci_high": high, "p_value": p, "test": DELONG_TEST,
                "p_mcnemar": np.nan, "n": int(len(y))})
        for row, p_holm in zip(family, holm(np.array([r["p_value"] for r in family], dtype=np.float64))):
            row["p_holm"] = float(p_holm)
        out += family
    return out


def paired_delong(y_true, scores) -> tuple[np.ndarray, np.ndarray] | None:
    """(AUCs [K], DeLong covariance [K, K]) of the scorers ``scores`` [K, n] on the same images;
    None when ``y_true`` has one class; covariance NaN with a single positive or negative."""
    from nfhm_pipeline.evaluation.confidence import _delong

    return _delong(y_true, scores)


def _normal_test(diff: float, var: float, z: float) -> tuple[float, float, float]:
    """(two-sided p, low, high) of a difference with DeLong variance ``var``."""
    if np.isnan(var):
        return np.nan, np.nan, np.nan
    if not var > 0:  # identical rankings, or one scorer's ranking a monotone image of the other's
        return (1.0 if diff == 0 else 0.0), diff, diff
    half = z * np.sqrt(var)
    return (float(2 * stats.norm.sf(abs(diff) / np.sqrt(var))),
            float(max(-1.0, diff - half)), float(min(1.0, diff + half)))


def bootstrap_summary_differences(scores: pd.DataFrame, *, seed: int, n_resamples: int = DEFAULT_RESAMPLES,
                                  units: pd.Series | None = None, level: float = 0.95) -> pd.DataFrame:
    """``model_differences`` rows (DIFFERENCE_COLUMNS, test ``bootstrap-paired``) of ``macro_auc`` and
    ``micro_auc`` from ``auc_scores`` rows of one dataset and split (columns model, task, level,
    finding, image_id, target, score; every label of a level at once). ``units``: image_id → resample
    unit, or None to draw images. See the module docstring. Rows sorted by task, level, metric,
    model_a, model_b.
    """
    missing = {"model", "task", "level", "finding", "image_id", "target", "score"} - set(scores.columns)
    if missing:
        raise EvaluationError(f"bootstrap_summary_differences needs auc_scores columns {sorted(missing)}")
    draw = {"seed": int(seed), "n_resamples": int(n_resamples), "units": units, "ci_level": level}
    rows: list[dict] = []
    for (task, lvl), part in scores.groupby(["task", "level"], sort=True):
        if task in CROSS_MODEL_TASKS:
            rows += _summary_family_rows(part, task, lvl, pair_with_self=False, **draw)
    heads = scores[scores["task"] == ALIGNMENT_HEAD]
    if len(heads):
        bases = scores[(scores["task"] == MULTILABEL_ZERO_SHOT) & scores["model"].isin(heads["model"].unique())]
        both = pd.concat([heads, bases], ignore_index=True)
        for (lvl, _), part in both.groupby(["level", "model"], sort=True):
            rows += _summary_family_rows(part, ALIGNMENT_HEAD, lvl, pair_with_self=True, **draw)
    frame = pd.DataFrame(rows).reindex(columns=DIFFERENCE_COLUMNS)
    return frame.sort_values(["task", "level", "metric", "model_a", "model_b"], kind="stable").reset_index(drop=True)


def _summary_family_rows(part: pd.DataFrame, task: str, level: str, *, pair_with_self: bool, seed: int,
                         n_resamples: int, units: pd.Series | None, ci_level: float) -> list[dict]:
    """The macro / micro rows of one (task, level): scorers are the models (cross-model) or the two
    tasks of one model (``pair_with_self``: alignment head first, zero-shot second)."""
    from nfhm_pipeline.evaluation.confidence import bootstrap_p_value, holm, percentile_interval, resample_counts

    column = "task" if pair_with_self else "model"
    if part.duplicated(["image_id", "finding", column]).any():
        raise EvaluationError(f"auc_scores holds an entry twice for {task}/{level}: the rows of one model and "
                              "task must come from one run (materialize it again)")
    names = [ALIGNMENT_HEAD, MULTILABEL_ZERO_SHOT] if pair_with_self else sorted(part[column].astype(str).unique())
    by_scorer = {name: rows for name, rows in part.groupby(part[column].astype(str), sort=True)}
    if len(names) < 2 or not set(names) <= set(by_scorer):
        return []
    common = sorted(set.intersection(*(set(by_scorer[n]["image_id"].astype(str)) for n in names)))
    if not common:
        return []
    image_ids = np.asarray(common)
    targets = part[part["image_id"].astype(str).isin(common)].pivot(
        index=["image_id", "finding"], columns=column, values="target")
    if (targets.max(axis=1) != targets.min(axis=1)).any():  # NaN where a scorer lacks the entry: skipped
        raise EvaluationError(f"the stored targets of {task}/{level} disagree between {names}: materialize "
                              "their AUC stages again on the current split")
    groups = units.reindex(image_ids).astype(str).to_numpy() if units is not None else None
    counts = resample_counts(len(image_ids), n_resamples, seed, groups=groups)
    values = {name: _summary_values(by_scorer[name], image_ids, counts) for name in names}
    model = str(part["model"].iloc[0])
    out = []
    for metric in SUMMARY_METRICS:
        for a in names[:1] if pair_with_self else names:
            point_a, resampled_a = values[a][metric]
            family = []
            for b in names:
                point_b, resampled_b = values[b][metric]
                if b == a or np.isnan(point_a) or np.isnan(point_b):
                    continue
                d = resampled_a - resampled_b
                d = d[np.isfinite(d)]
                low, high = percentile_interval(d, ci_level) if len(d) else (np.nan, np.nan)
                family.append({
                    "task": task, "level": level, "grp": "all", "metric": metric,
                    "model_a": model if pair_with_self else a, "model_b": model if pair_with_self else b,
                    "difference": float(point_a - point_b), "ci_low": float(low), "ci_high": float(high),
                    "p_value": bootstrap_p_value(d) if len(d) else np.nan, "test": BOOTSTRAP_TEST,
                    "p_mcnemar": np.nan, "n": int(len(image_ids))})
            for row, p_holm in zip(family, holm(np.array([r["p_value"] for r in family], dtype=np.float64))):
                row["p_holm"] = float(p_holm)
            out += family
    return out


def _summary_values(rows: pd.DataFrame, image_ids: np.ndarray, counts: np.ndarray) -> dict[str, tuple]:
    """metric → (value on the full sample, [B] resampled values) for MACRO_AUC and MICRO_AUC of one
    scorer's ``auc_scores`` rows, on the images ``image_ids`` (sorted) weighted by ``counts`` [B, n]."""
    from sklearn.metrics import roc_auc_score

    rows = rows[rows["image_id"].astype(str).isin(image_ids)]
    image = np.searchsorted(image_ids, rows["image_id"].astype(str).to_numpy())
    positive = rows["target"].to_numpy() == 1
    score = rows["score"].to_numpy(dtype=np.float64)
    label = rows["finding"].astype(str).to_numpy()
    points, resampled = [], []
    for name in sorted(set(label)):
        at = label == name
        if positive[at].all() or not positive[at].any():  # one class: no AUC, left out of macro
            continue
        points.append(float(roc_auc_score(positive[at], score[at])))
        resampled.append(resampled_auc(image[at], positive[at], score[at], counts))
    if points:
        # pandas' mean, as auc_summary's roc_auc_per_label(...)["auc"].dropna().mean()
        macro = float(pd.Series(points, dtype=np.float64).mean())
        stacked = np.stack(resampled)
        defined = np.isfinite(stacked)
        with np.errstate(invalid="ignore"):
            macro_resampled = np.where(defined.any(axis=0), np.where(defined, stacked, 0).sum(axis=0)
                                       / defined.sum(axis=0), np.nan)
    else:
        macro, macro_resampled = np.nan, np.full(counts.shape[0], np.nan)
    if positive.all() or not positive.any():
        micro, micro_resampled = np.nan, np.full(counts.shape[0], np.nan)
    else:
        micro = float(roc_auc_score(positive, score))
        micro_resampled = resampled_auc(image, positive, score, counts)
    return {MACRO_AUC: (macro, macro_resampled), MICRO_AUC: (micro, micro_resampled)}


def resampled_auc(image: np.ndarray, positive: np.ndarray, score: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """[B] ROC AUC of the entries (``image`` [E]: column of ``counts`` each entry belongs to,
    ``positive`` bool [E], ``score`` [E]) under each resample's image weights ``counts`` [B, n]:
    sum over positive p and negative q of w_p w_q (1 if s_p > s_q, 1/2 if equal) / (W_pos W_neg).
    NaN for a resample without a positive or a negative weight. Exact up to the final division:
    the weighted counts are integers, summed as int64."""
    order = np.argsort(score, kind="stable")
    image, positive, score = np.asarray(image)[order], np.asarray(positive, dtype=bool)[order], score[order]
    n_entries = len(score)
    starts_block = np.ones(n_entries, dtype=bool)
    starts_block[1:] = score[1:] != score[:-1]
    block = np.cumsum(starts_block) - 1  # tied scores form one block
    first = np.flatnonzero(starts_block)
    past = np.append(first[1:], n_entries)
    # negatives among the sorted entries before position k, k = 0..E: the column of the negative
    # cumulative sum that holds the weight below a block (first) and up to its end (past)
    negatives_before = np.concatenate([[0], np.cumsum(~positive)])
    below_first = negatives_before[first[block[positive]]]
    below_past = negatives_before[past[block[positive]]]
    pos_image, neg_image = image[positive], image[~positive]
    out = np.empty(counts.shape[0])
    chunk = max(1, _CHUNK_ELEMENTS // max(n_entries, 1))
    for a in range(0, counts.shape[0], chunk):
        weights = counts[a:a + chunk]
        below = np.zeros((len(weights), len(neg_image) + 1), dtype=np.int64)
        np.cumsum(weights[:, neg_image], axis=1, out=below[:, 1:])
        pos_weight = weights[:, pos_image].astype(np.int64)
        # twice the wins: 2 * (negatives strictly below) + (negatives tied), integers
        twice_wins = (pos_weight * (below[:, below_first] + below[:, below_past])).sum(axis=1)
        pairs = pos_weight.sum(axis=1) * below[:, -1]
        with np.errstate(invalid="ignore", divide="ignore"):
            out[a:a + chunk] = np.where(pairs > 0, twice_wins / (2.0 * pairs), np.nan)
    return out


def significance_by_label(differences: pd.DataFrame, *, task: str, level: str, model_a: str, model_b: str,
                          task_b: str | None = None) -> pd.Series:
    """label -> p of the comparison an AUC difference table shows (``model_b`` on ``task_b`` minus
    ``model_a`` on ``task``), from ``model_differences`` rows: DeLong's per label (``auc:<label>``
    rows, indexed by the label) and the paired bootstrap's for ``macro_auc`` / ``micro_auc``
    (indexed by those names, the rows ``auc_table_from_metrics`` adds); empty where none was stored.

    Same task, two models: the row (task, level, model_a = model_b, model_b = model_a) or its mirror
    (the p-value is symmetric). ``task`` zero-shot and ``task_b`` alignment head of one model: the
    alignment-head row of that model. Any other pairing has no test (an empty Series).
    """
    if differences is None or differences.empty:
        return pd.Series(dtype=np.float64)
    prefix = label_metric(AUC, "")
    metric = differences["metric"].astype(str)
    per_label = (differences["test"] == DELONG_TEST) & metric.str.startswith(prefix)
    summary = (differences["test"] == BOOTSTRAP_TEST) & metric.isin(SUMMARY_METRICS)
    rows = differences[(per_label | summary) & (differences["level"] == level)]
    task_b = task_b or task
    if task_b == task and task in CROSS_MODEL_TASKS and model_a != model_b:
        rows = rows[(rows["task"] == task) & (((rows["model_a"] == model_b) & (rows["model_b"] == model_a))
                                              | ((rows["model_a"] == model_a) & (rows["model_b"] == model_b)))]
    elif (task, task_b) == (MULTILABEL_ZERO_SHOT, ALIGNMENT_HEAD) and model_a == model_b:
        rows = rows[(rows["task"] == ALIGNMENT_HEAD) & (rows["model_a"] == model_a) & (rows["model_b"] == model_a)]
    else:
        return pd.Series(dtype=np.float64)
    rows = rows.drop_duplicates("metric")
    names = rows["metric"].astype(str)
    labels = names.where(~names.str.startswith(prefix), names.str[len(prefix):])
    return pd.Series(rows["p_value"].astype(np.float64).to_numpy(), index=labels.to_numpy())
