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

Macro and micro AUC get no test here: their variance needs the covariance between labels scored on
the same images, which the per-label components do not give.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from nfhm_pipeline.errors import EvaluationError
from nfhm_pipeline.evaluation.intervals import DIFFERENCE_COLUMNS
from nfhm_pipeline.evaluation.names import ALIGNMENT_HEAD, AUC, MULTILABEL_PROBE, MULTILABEL_ZERO_SHOT, label_metric

DELONG_TEST = "delong"
# columns of the rows a stage hands to store_results (table auc_scores, without dataset/model/run/split)
SCORE_COLUMNS = ["task", "level", "finding", "image_id", "target", "score"]
# tasks compared model against model; ALIGNMENT_HEAD is compared with its model's zero-shot
CROSS_MODEL_TASKS = (MULTILABEL_PROBE, MULTILABEL_ZERO_SHOT)


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


def significance_by_label(differences: pd.DataFrame, *, task: str, level: str, model_a: str, model_b: str,
                          task_b: str | None = None) -> pd.Series:
    """label -> DeLong p of the comparison an AUC difference table shows (``model_b`` on ``task_b``
    minus ``model_a`` on ``task``), from ``model_differences`` rows; empty where none was stored.

    Same task, two models: the row (task, level, model_a = model_b, model_b = model_a) or its mirror
    (the p-value is symmetric). ``task`` zero-shot and ``task_b`` alignment head of one model: the
    alignment-head row of that model. Any other pairing has no test (an empty Series).
    """
    if differences is None or differences.empty:
        return pd.Series(dtype=np.float64)
    rows = differences[(differences["test"] == DELONG_TEST) & (differences["level"] == level)]
    task_b = task_b or task
    if task_b == task and task in CROSS_MODEL_TASKS and model_a != model_b:
        rows = rows[(rows["task"] == task) & (((rows["model_a"] == model_b) & (rows["model_b"] == model_a))
                                              | ((rows["model_a"] == model_a) & (rows["model_b"] == model_b)))]
    elif (task, task_b) == (MULTILABEL_ZERO_SHOT, ALIGNMENT_HEAD) and model_a == model_b:
        rows = rows[(rows["task"] == ALIGNMENT_HEAD) & (rows["model_a"] == model_a) & (rows["model_b"] == model_a)]
    else:
        return pd.Series(dtype=np.float64)
    prefix = label_metric(AUC, "")
    rows = rows[rows["metric"].astype(str).str.startswith(prefix)].drop_duplicates("metric")
    return pd.Series(rows["p_value"].astype(np.float64).to_numpy(),
                     index=rows["metric"].astype(str).str[len(prefix):].to_numpy())
