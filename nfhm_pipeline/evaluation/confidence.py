"""Uncertainty of evaluation results: confidence intervals, paired comparisons, multiple testing.

Methods (numpy and scipy only):

* Resampling (``resample_counts``): a resample is a count vector over the test items, how many
  times each item is drawn. Items are drawn with replacement, n of n (the plain bootstrap); with
  ``groups`` whole groups are drawn (a cluster bootstrap: as many groups as there are, each drawn
  group adds 1 to every item in it), for items that are not independent (several images of one
  specimen, one site, one patient); with ``strata`` items are drawn within each stratum keeping
  its size (e.g. the true class, for balanced accuracy and macro-F1). One count matrix is used
  for every model and rule, so all comparisons are paired: each resample is the same test set
  for all of them.
* Resampled accuracies (``bootstrap_accuracy``): accuracy under weights = (counts @ correct) /
  counts.sum(1), one matrix product for all models ([B, n] @ [n, M]). Counts and 0/1 values are
  small integers, so the products and sums are exact in float64.
* Intervals: percentile bootstrap intervals (``percentile_interval``, numpy's linear
  interpolation, as ``scipy.stats.bootstrap(method="percentile")``); Wilson score intervals for
  a single proportion (``wilson_interval``); BCa intervals of one statistic through scipy
  (``bca_interval``, for notebook use).
* Paired differences (``paired_differences``): acc[reference] - acc[b] for every other model b;
  percentile interval of the resampled differences, and the two-sided bootstrap p-value
  min(1, 2 min((#{d* <= 0} + 1) / (B + 1), (#{d* >= 0} + 1) / (B + 1))), never 0.
* McNemar (``mcnemar_exact``): exact two-sided binomial test on the discordant pairs, for two
  models on the same test items without resampling.
* Holm (``holm``): step-down adjusted p-values for a family of comparisons.
* AUC (``delong_auc``, ``delong_interval``, ``delong_paired_test``): DeLong, DeLong and
  Clarke-Pearson (1988) structural components computed with midranks (Sun and Xu, 2014), so ties
  count one half; the variance of an AUC and the covariance of two AUCs on the same images.
* ``detectable_difference``: the half-width of a normal-approximation interval of a paired
  accuracy difference, for the line "with N test images, differences under X points cannot be
  told apart".

Random numbers come from ``numpy.random.default_rng(seed)``: the same arguments give the same
counts. Inputs that cannot be used raise ``ConfidenceInputError`` (an ``EvaluationError`` and a
``ValueError``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy import sparse, stats

from nfhm_pipeline.errors import EvaluationError

_CHUNK_ELEMENTS = 1 << 22  # elements per temporary block of draws or converted counts (16-32 MB)


class ConfidenceInputError(EvaluationError, ValueError):
    """Arguments to a confidence-interval or test function cannot be used."""


# ---------------------------------------------------------------------------------------- resampling


def resample_counts(
    n_items: int,
    n_resamples: int = 1000,
    seed: int = 0,
    *,
    groups: np.ndarray | None = None,
    strata: np.ndarray | None = None,
) -> np.ndarray:
    """How many times each test item is drawn in each resample: int32 [n_resamples, n_items].

    Plain: n_items items drawn with replacement, so each row sums to n_items. ``groups`` [n_items]
    (any labels, one per item): as many groups as there are are drawn with replacement and each
    drawn group adds 1 to all its items, so an item's count is its group's count and a row sums
    to the total size of the drawn groups. ``strata`` [n_items]: the items of each stratum are
    drawn with replacement within it, as many as it has, so every stratum keeps its size in every
    row. ``groups`` and ``strata`` together are not supported (ConfidenceInputError).
    Deterministic for a seed; use one count matrix for every model to pair the comparisons.
    """
    n_items, n_resamples = _positive_int(n_items, "n_items"), _positive_int(n_resamples, "n_resamples")
    if groups is not None and strata is not None:
        raise ConfidenceInputError(
            "resample_counts got both groups and strata; groups within strata are not supported: "
            "pass groups (items that are not independent) or strata (sizes to keep), not both."
        )
    rng = np.random.default_rng(seed)
    if groups is not None:
        inv, n_groups = _codes(groups, n_items, "groups")
        return _uniform_counts(rng, n_resamples, n_groups)[:, inv]
    if strata is None:
        return _uniform_counts(rng, n_resamples, n_items)
    inv, n_strata = _codes(strata, n_items, "strata")
    order = np.argsort(inv, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(inv, minlength=n_strata))])
    counts = np.empty((n_resamples, n_items), dtype=np.int32)
    for a, b in zip(bounds[:-1], bounds[1:]):  # strata in sorted label order
        counts[:, order[a:b]] = _uniform_counts(rng, n_resamples, int(b - a))
    return counts


def _uniform_counts(rng: np.random.Generator, n_rows: int, k: int) -> np.ndarray:
    """int32 [n_rows, k]: counts of k draws with replacement from k equally likely categories."""
    out = np.empty((n_rows, k), dtype=np.int32)
    chunk = max(1, _CHUNK_ELEMENTS // k)
    for a in range(0, n_rows, chunk):
        c = min(chunk, n_rows - a)
        draws = rng.integers(0, k, size=(c, k), dtype=np.int32 if k < 2**31 else np.int64)
        if k >= 1024:  # one bincount per row: fast for long rows
            for i, row in enumerate(draws):
                out[a + i] = np.bincount(row, minlength=k)
        else:  # one bincount for the block, rows offset by k
            flat = (draws + (np.arange(c, dtype=np.int64) * k)[:, None]).ravel()
            out[a : a + c] = np.bincount(flat, minlength=c * k).reshape(c, k)
    return out


def _codes(labels, n_items: int, name: str) -> tuple[np.ndarray, int]:
    labels = np.asarray(labels)
    if labels.shape != (n_items,):
        raise ConfidenceInputError(
            f"{name} has shape {labels.shape} but there are {n_items} items; give one label per item."
        )
    try:
        values, inv = np.unique(labels, return_inverse=True)
    except TypeError as e:
        raise ConfidenceInputError(f"{name} labels cannot be sorted ({e}); use labels of one type.") from e
    return inv.reshape(-1), len(values)


def _positive_int(value, name: str) -> int:
    if int(value) != value or value < 1:
        raise ConfidenceInputError(f"{name} must be a whole number >= 1, got {value!r}.")
    return int(value)


def _level(level: float) -> float:
    if not 0 < level < 1:
        raise ConfidenceInputError(f"level must lie strictly between 0 and 1 (e.g. 0.95), got {level!r}.")
    return float(level)


def _z(level: float) -> float:
    return float(stats.norm.ppf(0.5 + _level(level) / 2))


# ---------------------------------------------------------------------------------------- bootstrap


def _correct_matrix(correct) -> np.ndarray:
    x = np.asarray(correct)
    if x.ndim not in (1, 2) or x.shape[0] == 0:
        raise ConfidenceInputError(
            f"correct must be [n_items] or [n_items, n_models] with n_items >= 1, got shape {x.shape}."
        )
    if x.dtype.kind not in "biuf":
        raise ConfidenceInputError(f"correct must hold booleans or numbers, got dtype {x.dtype}.")
    x = x.astype(np.float64)
    if not np.isfinite(x).all():
        raise ConfidenceInputError("correct holds NaN or infinite values; score every test item of every model.")
    return x


def _check_counts(counts, n_items: int) -> np.ndarray:
    counts = np.asarray(counts)
    if counts.ndim != 2 or counts.shape[1] != n_items:
        raise ConfidenceInputError(
            f"counts has shape {counts.shape} but must be [n_resamples, {n_items}] (one column per test item); "
            "make it with resample_counts(n_items, ...)."
        )
    return counts


def bootstrap_accuracy(correct: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Resampled accuracies [B, M] = (counts @ correct) / counts.sum(1), all models in one product.

    ``correct`` [n, M] bool or float (1 = item right; any per-item score works: the result is its
    weighted mean), or [n] (then the result is [B]). ``counts`` [B, n] from ``resample_counts``.
    """
    x = _correct_matrix(correct)
    counts = _check_counts(counts, x.shape[0])
    totals = counts.sum(axis=1, dtype=np.float64)
    if not (totals > 0).all():
        raise ConfidenceInputError("a row of counts has zero total weight; make counts with resample_counts.")
    # float32 products are exact when every partial sum is an integer below 2^24 (0/1 values,
    # integer counts, row totals < 2^24): then they equal float64 ones, at twice the speed.
    exact32 = (
        counts.dtype.kind in "biu" and totals.max() < 2**24 and ((x == 0) | (x == 1)).all()
    )
    dtype = np.float32 if exact32 else np.float64
    xd = x.astype(dtype)
    out = np.empty((counts.shape[0],) + x.shape[1:])
    chunk = max(128, _CHUNK_ELEMENTS // counts.shape[1])  # BLAS is slow on few rows
    for a in range(0, counts.shape[0], chunk):
        out[a : a + chunk] = counts[a : a + chunk].astype(dtype) @ xd
    return out / (totals[:, None] if x.ndim == 2 else totals)


def percentile_interval(samples: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval over axis 0 of ``samples`` [B, ...]: (low [...], high [...]), the
    (1 - level) / 2 and (1 + level) / 2 quantiles with linear interpolation."""
    alpha = 1 - _level(level)
    samples = np.asarray(samples, dtype=np.float64)
    if samples.ndim == 0 or samples.shape[0] == 0:
        raise ConfidenceInputError(f"samples must be [B, ...] with B >= 1, got shape {samples.shape}.")
    low, high = np.percentile(samples, [100 * alpha / 2, 100 * (1 - alpha / 2)], axis=0)
    return low, high


def bca_interval(values, statistic: Callable[[np.ndarray], float] = np.mean, *, n_resamples: int = 1000,
                 seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """(estimate, low, high): the bias-corrected and accelerated (BCa) bootstrap interval of
    ``statistic`` over the items ``values`` [n], through ``scipy.stats.bootstrap(method="BCa")``.

    For a notebook user with one metric's per-item scores (the pipeline's stored intervals are
    paired percentile intervals: BCa's jackknife acceleration is per statistic and model, so it
    cannot share one count matrix). A sample whose values are all equal has the degenerate
    interval [v, v] (scipy would return NaN with a warning); fewer than 2 items or non-finite
    values raise :class:`ConfidenceInputError`.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or len(x) < 2:
        raise ConfidenceInputError(f"values must be 1-D with at least 2 items, got shape {x.shape}.")
    if not np.isfinite(x).all():
        raise ConfidenceInputError(f"values hold {int((~np.isfinite(x)).sum())} NaN or inf item(s).")
    n_resamples, level = _positive_int(n_resamples, "n_resamples"), _level(level)
    estimate = float(statistic(x))
    if np.all(x == x[0]):
        return estimate, estimate, estimate
    result = stats.bootstrap((x,), statistic, n_resamples=n_resamples, confidence_level=level, method="BCa",
                             random_state=np.random.default_rng(seed), vectorized=False)
    interval = result.confidence_interval
    return estimate, float(interval.low), float(interval.high)


@dataclass
class Interval:
    """Point estimates and interval bounds, each [M] (one per model or rule; 0-d for [n] input).
    ``method``: how the bounds were computed, e.g. "bootstrap-paired"."""

    estimate: np.ndarray
    low: np.ndarray
    high: np.ndarray
    method: str


def accuracy_intervals(
    correct: np.ndarray,
    *,
    n_resamples: int = 1000,
    seed: int = 0,
    groups: np.ndarray | None = None,
    level: float = 0.95,
) -> Interval:
    """Accuracy of each model with a percentile bootstrap interval, all models on the same resamples.

    ``correct`` [n, M] (or [n]); ``groups`` [n]: resample whole groups (see ``resample_counts``).
    estimate = plain mean of ``correct`` per column; method "bootstrap-paired".
    """
    x = _correct_matrix(correct)
    counts = resample_counts(x.shape[0], n_resamples, seed, groups=groups)
    low, high = percentile_interval(bootstrap_accuracy(x, counts), level)
    return Interval(estimate=x.mean(axis=0), low=low, high=high, method="bootstrap-paired")


def bootstrap_statistic(statistic: Callable[[np.ndarray], np.ndarray], counts: np.ndarray) -> np.ndarray:
    """``statistic`` evaluated on each resample: [B, ...] (the statistic's shape after B).

    ``statistic`` takes a weight vector [n] (one row of ``counts``, int32) and returns the weighted
    statistic, e.g. ``lambda w: weighted_macro_f1(y_true, y_pred, w)``.
    """
    counts = np.asarray(counts)
    if counts.ndim != 2 or counts.shape[0] == 0:
        raise ConfidenceInputError(f"counts must be [n_resamples, n_items], got shape {counts.shape}.")
    return np.stack([np.asarray(statistic(row), dtype=np.float64) for row in counts])


def _class_sums(y_true, y_pred, weights):
    """Weighted per-class sums over the union of labels: (support, predicted, hits), each [..., C]
    for ``weights`` [n] or [B, n]."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.ndim != 1 or y_pred.shape != y_true.shape:
        raise ConfidenceInputError(f"y_true {y_true.shape} and y_pred {y_pred.shape} must be 1-D of one length.")
    w = np.asarray(weights, dtype=np.float64)
    if w.shape[-1:] != y_true.shape or w.ndim > 2:
        raise ConfidenceInputError(f"weights has shape {w.shape}; give [n] or [B, n] with n = {len(y_true)}.")
    if (w < 0).any() or not np.isfinite(w).all():
        raise ConfidenceInputError("weights must be finite and >= 0.")
    try:
        _, inv = np.unique(np.concatenate([y_true, y_pred]), return_inverse=True)
    except TypeError as e:
        raise ConfidenceInputError(f"labels cannot be sorted ({e}); use labels of one type.") from e
    inv = inv.reshape(-1)
    n, C = len(y_true), int(inv.max()) + 1
    t, p = inv[:n], inv[n:]
    rows = np.arange(n)
    one = np.ones(n)
    T = sparse.csr_matrix((one, (rows, t)), shape=(n, C))
    P = sparse.csr_matrix((one, (rows, p)), shape=(n, C))
    H = sparse.csr_matrix(((t == p).astype(np.float64), (rows, t)), shape=(n, C))
    w2 = np.atleast_2d(w)
    sums = [np.asarray(M.T @ w2.T).T for M in (T, P, H)]  # [B, C]
    if w.ndim == 1:
        sums = [s[0] for s in sums]
    return sums


def weighted_balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Balanced accuracy (mean recall over the true classes) with item weights.

    ``y_true``, ``y_pred`` [n] labels; ``weights`` [n] (returns a float) or [B, n] (returns [B]).
    Classes whose true items all have weight 0 are left out, so integer weights give the value of
    sklearn's balanced_accuracy_score on the sample with each item repeated weight times, and unit
    weights sklearn's value itself. NaN when every weight is 0.
    """
    support, _, hits = _class_sums(y_true, y_pred, weights)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, hits / np.where(support > 0, support, 1), np.nan)
        return _nanmean_last(recall)


def weighted_macro_f1(y_true: np.ndarray, y_pred: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Macro-averaged F1 with item weights: mean over labels of 2 TP / (2 TP + FP + FN).

    Shapes as ``weighted_balanced_accuracy``. The labels averaged over are those with positive
    weight as a true or a predicted label: unit weights give sklearn's f1_score(average="macro"),
    integer weights its value on the sample with each item repeated weight times.
    """
    support, predicted, hits = _class_sums(y_true, y_pred, weights)
    present = (support + predicted) > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(present, 2 * hits / np.where(present, support + predicted, 1), np.nan)
        return _nanmean_last(f1)


def _nanmean_last(x: np.ndarray):
    count = (~np.isnan(x)).sum(axis=-1)
    total = np.nansum(x, axis=-1)
    out = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return float(out) if out.ndim == 0 else out


# ---------------------------------------------------------------------------------- paired tests


@dataclass
class Difference:
    """One paired comparison: ``difference`` = accuracy[model_a] - accuracy[model_b] (fraction),
    its interval [low, high], two-sided ``p_value`` of ``test``, on ``n`` test items."""

    model_a: int
    model_b: int
    difference: float
    low: float
    high: float
    p_value: float
    test: str
    n: int


def paired_differences(
    correct: np.ndarray, reference: int, counts: np.ndarray, level: float = 0.95
) -> list[Difference]:
    """acc[reference] - acc[b] for every other column b of ``correct`` [n, M], in column order.

    Interval: percentile interval of the resampled differences on the same ``counts`` [B, n];
    p-value: min(1, 2 min((#{d* <= 0} + 1) / (B + 1), (#{d* >= 0} + 1) / (B + 1))); test
    "bootstrap-paired". ``difference`` is the difference of the plain means.
    """
    x = _correct_matrix(correct)
    if x.ndim != 2:
        raise ConfidenceInputError(f"correct must be [n_items, n_models] to compare models, got shape {x.shape}.")
    M = x.shape[1]
    if int(reference) != reference or not 0 <= reference < M:
        raise ConfidenceInputError(f"reference must be a column index in 0..{M - 1}, got {reference!r}.")
    reference = int(reference)
    samples = bootstrap_accuracy(x, counts)
    estimate = x.mean(axis=0)
    out = []
    for b in range(M):
        if b == reference:
            continue
        d = samples[:, reference] - samples[:, b]
        low, high = percentile_interval(d, level)
        out.append(Difference(
            model_a=reference, model_b=b, difference=float(estimate[reference] - estimate[b]),
            low=float(low), high=float(high), p_value=bootstrap_p_value(d),
            test="bootstrap-paired", n=x.shape[0],
        ))
    return out


def mcnemar_exact(correct_a: np.ndarray, correct_b: np.ndarray) -> float:
    """Exact two-sided McNemar p-value for two models on the same items (``correct_*`` bool [n]).

    With b01 = #(a right, b wrong) and b10 = #(a wrong, b right):
    p = min(1, 2 binom.cdf(min(b01, b10), b01 + b10, 1/2)); 1.0 without discordant pairs.
    """
    a, b = np.asarray(correct_a), np.asarray(correct_b)
    if a.ndim != 1 or a.shape != b.shape:
        raise ConfidenceInputError(
            f"correct_a {a.shape} and correct_b {b.shape} must be 1-D of one length (the same items)."
        )
    a, b = a.astype(bool), b.astype(bool)
    b01, b10 = int(np.count_nonzero(a & ~b)), int(np.count_nonzero(~a & b))
    if b01 + b10 == 0:
        return 1.0
    return float(min(1.0, 2 * stats.binom.cdf(min(b01, b10), b01 + b10, 0.5)))


def bootstrap_p_value(resampled_differences) -> float:
    """Two-sided bootstrap p of resampled differences d* [B]:
    min(1, 2 min(#{d* <= 0} + 1, #{d* >= 0} + 1) / (B + 1)) (the +1 keeps p above 0 with finite B)."""
    d = np.asarray(resampled_differences, dtype=np.float64)
    tail = min(np.count_nonzero(d <= 0), np.count_nonzero(d >= 0))
    return float(min(1.0, 2 * (tail + 1) / (len(d) + 1)))


def holm(p_values) -> np.ndarray:
    """Holm step-down adjusted p-values, same shape as ``p_values``; NaN stays NaN and is not
    counted in the family. Sorted p_(1) <= ... <= p_(m): adjusted p_(i) =
    max over j <= i of min(1, (m - j + 1) p_(j)), so the adjusted values are monotone in p."""
    p = np.asarray(p_values, dtype=np.float64)
    flat = p.ravel()
    keep = ~np.isnan(flat)
    if ((flat[keep] < 0) | (flat[keep] > 1)).any():
        raise ConfidenceInputError("p_values must lie in [0, 1] (or be NaN).")
    out = np.full(flat.shape, np.nan)
    ps = flat[keep]
    m = len(ps)
    order = np.argsort(ps, kind="stable")
    adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * ps[order]))
    sub = np.empty(m)
    sub[order] = adjusted
    out[keep] = sub
    return out.reshape(p.shape)


# ---------------------------------------------------------------------------------------- DeLong


def _delong(y_true, scores) -> tuple[np.ndarray, np.ndarray] | None:
    """(AUCs [K], covariance [K, K]) of the scorers ``scores`` [K, n]; None for one class only.
    The covariance is NaN when a class has a single item (its variance cannot be estimated)."""
    y = np.asarray(y_true)
    s = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    if y.ndim != 1 or s.shape[1] != len(y):
        raise ConfidenceInputError(f"y_true {y.shape} and scores {np.shape(scores)} must describe the same items.")
    if y.dtype != bool:
        if not np.isin(y, (0, 1)).all():
            raise ConfidenceInputError("y_true must be bool or 0/1 (1 = positive).")
        y = y == 1
    if not np.isfinite(s).all():
        raise ConfidenceInputError("scores hold NaN or infinite values.")
    m, n = int(y.sum()), int((~y).sum())
    if m == 0 or n == 0:
        return None
    pos, neg = s[:, y], s[:, ~y]
    tz = stats.rankdata(np.concatenate([pos, neg], axis=1), axis=1)  # midranks: ties count 1/2
    tx, ty = stats.rankdata(pos, axis=1), stats.rankdata(neg, axis=1)
    auc = (tz[:, :m].sum(axis=1) - m * (m + 1) / 2) / (m * n)
    v10 = (tz[:, :m] - tx) / n  # per positive: fraction of negatives below it
    v01 = 1 - (tz[:, m:] - ty) / m  # per negative: fraction of positives above it
    K = s.shape[0]
    if m < 2 or n < 2:
        return auc, np.full((K, K), np.nan)
    cov = np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n
    return auc, cov


def delong_auc(y_true: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """(AUC, DeLong variance) of ``scores`` [n] (higher = more positive) for ``y_true`` [n] bool/0-1.

    Variance = var(V10) / m + var(V01) / n with the structural components V10 (per positive, the
    fraction of negatives scored below it, ties 1/2) and V01 (per negative), sample variances.
    (NaN, NaN) when y_true has one class only; variance NaN with a single positive or negative.
    """
    r = _delong(y_true, scores)
    if r is None:
        return float("nan"), float("nan")
    return float(r[0][0]), float(r[1][0, 0])


def delong_interval(y_true: np.ndarray, scores: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """(AUC, low, high): AUC -/+ z sqrt(DeLong variance), clipped to [0, 1]; NaNs for one class."""
    z = _z(level)
    auc, var = delong_auc(y_true, scores)
    half = z * np.sqrt(var) if var >= 0 else float("nan")
    return auc, float(np.clip(auc - half, 0, 1)), float(np.clip(auc + half, 0, 1))


def delong_paired_test(y_true: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray) -> tuple[float, float]:
    """(AUC_a - AUC_b, two-sided p) for two scorers on the same items (DeLong's paired test):
    z = difference / sqrt(var_a + var_b - 2 cov_ab). p = 1 when the difference and its variance
    are both 0 (e.g. identical rankings), 0 when only the variance is. NaNs for one class only."""
    r = _delong(y_true, np.stack([np.asarray(scores_a, dtype=np.float64), np.asarray(scores_b, dtype=np.float64)]))
    if r is None:
        return float("nan"), float("nan")
    auc, cov = r
    diff = float(auc[0] - auc[1])
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    if np.isnan(var):
        return diff, float("nan")
    if not var > 0:
        return diff, 1.0 if diff == 0 else 0.0
    return diff, float(2 * stats.norm.sf(abs(diff) / np.sqrt(var)))


# -------------------------------------------------------------------------------- power statement


def wilson_interval(k, n, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval of a proportion k / n, vectorised over k and n (broadcast).

    (k + z^2/2) / (n + z^2) -/+ z / (n + z^2) sqrt(k (n - k) / n + z^2 / 4), clipped to [0, 1];
    (NaN, NaN) where n == 0. Raises on k < 0, k > n or n < 0.
    """
    z = _z(level)
    k, n = np.broadcast_arrays(np.asarray(k, dtype=np.float64), np.asarray(n, dtype=np.float64))
    if (n < 0).any() or (k < 0).any() or (k > n).any():
        raise ConfidenceInputError("wilson_interval needs 0 <= k <= n.")
    with np.errstate(invalid="ignore", divide="ignore"):
        centre = (k + z * z / 2) / (n + z * z)
        half = z / (n + z * z) * np.sqrt(k * (n - k) / n + z * z / 4)
        low = np.where(n > 0, np.clip(centre - half, 0, 1), np.nan)
        high = np.where(n > 0, np.clip(centre + half, 0, 1), np.nan)
    return low, high


def detectable_difference(
    n_items: int, accuracy: float = 0.5, level: float = 0.95, *, discordance: float | None = None
) -> float:
    """Half-width (fraction; x100 for points) of the normal interval of a paired accuracy
    difference between two models of accuracy ``accuracy`` on ``n_items`` test items.

    The variance of a paired difference is (p01 + p10 - (p01 - p10)^2) / n with p01, p10 the
    fractions of items only one of the two gets right. At difference 0 it is q / n with q the
    discordant fraction, at most 2 min(p, 1 - p) (the models never both right, or never both
    wrong, beyond what p forces). Worst case (default): z sqrt(2 min(p, 1 - p) / n_items), i.e.
    z / sqrt(n_items) at p = 1/2; with ``discordance`` = q given: z sqrt(q / n_items). For
    independent errors q = 2 p (1 - p).
    """
    n_items = _positive_int(n_items, "n_items")
    if not 0 <= accuracy <= 1:
        raise ConfidenceInputError(f"accuracy must lie in [0, 1], got {accuracy!r}.")
    q = 2 * min(accuracy, 1 - accuracy) if discordance is None else float(discordance)
    if not 0 <= q <= 1:
        raise ConfidenceInputError(f"discordance must lie in [0, 1], got {discordance!r}.")
    return float(_z(level) * np.sqrt(q / n_items))
