"""Confidence intervals and paired tests (evaluation.confidence) against scipy, statsmodels,
sklearn, formulas written out by hand, and coverage on synthetic data with a known truth."""
import math

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

from nfhm_pipeline.errors import EvaluationError
from nfhm_pipeline.evaluation.confidence import (
    Difference, Interval, accuracy_intervals, bootstrap_accuracy, bootstrap_statistic, delong_auc, delong_interval,
    delong_paired_test, detectable_difference, holm, mcnemar_exact, paired_differences, percentile_interval,
    resample_counts, weighted_balanced_accuracy, weighted_macro_f1, wilson_interval,
)

Z95 = 1.959963984540054  # norm.ppf(0.975)


# ------------------------------------------------------------------------------ resample_counts


def test_item_resamples_draw_n_of_n_with_replacement():
    counts = resample_counts(50, 400, seed=3)
    assert counts.shape == (400, 50) and counts.dtype == np.int32
    assert (counts.sum(axis=1) == 50).all() and (counts >= 0).all()
    # each count is Binomial(50, 1/50): mean 1, variance 0.98, P(0) = 0.364
    assert abs(counts.mean() - 1) < 1e-12
    assert abs(counts.var() - 0.98) < 0.03
    assert abs((counts == 0).mean() - (49 / 50) ** 50) < 0.01


def test_resamples_are_deterministic_for_a_seed():
    groups = np.repeat(np.arange(7), 3)
    for kwargs in ({}, {"groups": groups}, {"strata": groups % 2}):
        a = resample_counts(21, 30, seed=11, **kwargs)
        assert np.array_equal(a, resample_counts(21, 30, seed=11, **kwargs))
        assert not np.array_equal(a, resample_counts(21, 30, seed=12, **kwargs))


def test_group_resamples_draw_whole_groups():
    rng = np.random.default_rng(0)
    sizes = np.array([1, 4, 2, 7, 3, 3])
    groups = rng.permutation(np.repeat(np.array(list("abcdef")), sizes))  # string labels, shuffled items
    counts = resample_counts(len(groups), 500, seed=1, groups=groups)
    assert counts.shape == (500, sizes.sum())
    per_group = []
    for g, size in zip("abcdef", sizes):
        cols = counts[:, groups == g]
        assert (cols == cols[:, :1]).all()  # all items of a group drawn together
        per_group.append(cols[:, 0])
    per_group = np.stack(per_group, axis=1)
    assert (per_group.sum(axis=1) == 6).all()  # as many groups drawn as there are
    assert np.array_equal(counts.sum(axis=1), per_group @ sizes)  # a row sums to the drawn groups' sizes
    assert abs(per_group.mean() - 1) < 1e-12 and per_group.std() > 0.5


def test_stratified_resamples_keep_every_stratum_size():
    strata = np.array([0] * 5 + [1] * 12 + [2] * 1 + [1] * 3)
    counts = resample_counts(len(strata), 300, seed=2, strata=strata)
    for s in (0, 1, 2):
        assert (counts[:, strata == s].sum(axis=1) == (strata == s).sum()).all()
    assert (counts[:, strata == 2] == 1).all()
    assert counts[:, strata == 1].std() > 0.5  # items still resampled within a stratum


def test_groups_and_strata_together_and_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="both groups and strata"):
        resample_counts(4, 10, groups=np.arange(4), strata=np.zeros(4))
    with pytest.raises(EvaluationError, match="one label per item"):
        resample_counts(4, 10, groups=np.arange(3))
    with pytest.raises(EvaluationError, match="n_items"):
        resample_counts(0, 10)


# ------------------------------------------------------------------------------ bootstrap intervals


def test_bootstrap_accuracy_is_the_weighted_mean_of_every_column():
    rng = np.random.default_rng(4)
    correct = rng.random((60, 5)) < 0.6
    counts = resample_counts(60, 40, seed=0)
    got = bootstrap_accuracy(correct, counts)
    expected = np.array([[np.average(correct[:, j], weights=w) for j in range(5)] for w in counts])
    assert got.shape == (40, 5)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-15)
    np.testing.assert_allclose(bootstrap_accuracy(correct[:, 2], counts), expected[:, 2], rtol=0, atol=1e-15)
    # the float32 product used for 0/1 values and integer counts is exact: equal to float64's
    np.testing.assert_array_equal(got, bootstrap_accuracy(correct, counts.astype(np.float64)))


def test_percentile_intervals_match_scipy_bootstrap_paired():
    rng = np.random.default_rng(5)
    n, B = 40, 20000
    a = rng.gamma(2.0, size=n)
    b = a + rng.normal(0.3, 0.2, size=n)  # strongly correlated with a: an unpaired interval is far wider
    x = np.stack([a, b], axis=1)
    counts = resample_counts(n, B, seed=6)
    low, high = percentile_interval(bootstrap_accuracy(x, counts))
    for j, col in enumerate((a, b)):
        ref = stats.bootstrap((col,), np.mean, n_resamples=B, method="percentile", rng=7).confidence_interval
        tol = 0.1 * col.std() / math.sqrt(n)  # Monte-Carlo error of a 2.5 % quantile at B = 20000: ~0.03 SE
        assert abs(low[j] - ref.low) < tol and abs(high[j] - ref.high) < tol

    def diff(u, v, axis=-1):
        return u.mean(axis=axis) - v.mean(axis=axis)

    ref = stats.bootstrap((a, b), diff, paired=True, vectorized=True, n_resamples=B, method="percentile", rng=8)
    [d] = paired_differences(x, 0, counts)
    tol = 0.1 * (a - b).std() / math.sqrt(n)
    assert d.model_a == 0 and d.model_b == 1 and d.n == n and d.test == "bootstrap-paired"
    assert d.difference == pytest.approx(a.mean() - b.mean())
    assert abs(d.low - ref.confidence_interval.low) < tol and abs(d.high - ref.confidence_interval.high) < tol


def test_accuracy_intervals_estimate_is_the_plain_mean():
    rng = np.random.default_rng(9)
    correct = rng.random((300, 3)) < [0.2, 0.5, 0.9]
    iv = accuracy_intervals(correct, n_resamples=500, seed=1)
    assert isinstance(iv, Interval) and iv.method == "bootstrap-paired"
    np.testing.assert_array_equal(iv.estimate, correct.mean(axis=0))
    assert (iv.low < iv.estimate).all() and (iv.estimate < iv.high).all()
    # the bootstrap interval of a proportion is close to the Wilson interval at n = 300
    wl, wh = wilson_interval(correct.sum(axis=0), 300)
    np.testing.assert_allclose(iv.low, wl, atol=0.012)
    np.testing.assert_allclose(iv.high, wh, atol=0.012)


def test_paired_difference_p_values():
    n, B = 200, 999
    counts = resample_counts(n, B, seed=0)
    base = np.arange(n) % 3 == 0
    better = base | (np.arange(n) % 3 == 1)  # right on every item base gets right, and more
    close = base.copy()
    close[[1, 4]] = True
    close[[0]] = False  # differs from base on 3 items only
    diffs = paired_differences(np.stack([base, base, better, close], axis=1), 0, counts)
    assert [d.model_b for d in diffs] == [1, 2, 3] and all(isinstance(d, Difference) for d in diffs)
    same, worse, near = diffs
    assert same.difference == 0 and same.low == same.high == 0 and same.p_value == 1.0
    assert worse.difference < 0 and worse.high < 0
    assert worse.p_value == pytest.approx(2 / (B + 1))  # never 0: the +1 correction
    assert near.low < 0 < near.high and near.p_value > 0.3


def test_detectable_difference_is_the_half_width_at_maximal_discordance():
    assert detectable_difference(10_000) == pytest.approx(Z95 / 100)
    assert detectable_difference(400, accuracy=0.9) == pytest.approx(Z95 * math.sqrt(0.2 / 400))
    assert detectable_difference(400, accuracy=0.9, discordance=0.05) == pytest.approx(Z95 * math.sqrt(0.05 / 400))
    # two models at 50 % that are never right together: the paired bootstrap interval has that half-width
    n = 2000
    a = np.arange(n) < n // 2
    [d] = paired_differences(np.stack([a, ~a], axis=1), 0, resample_counts(n, 2000, seed=1))
    assert (d.high - d.low) / 2 == pytest.approx(detectable_difference(n), rel=0.05)


# ------------------------------------------------------------------------------ coverage


def test_item_bootstrap_covers_a_known_accuracy_95_percent_of_the_time():
    truth, n, reps = 0.7, 200, 2000
    rng = np.random.default_rng(123)
    covered = 0
    for r in range(reps):  # a fresh test set each time
        iv = accuracy_intervals(rng.random((n, 1)) < truth, n_resamples=200, seed=r)
        covered += bool(iv.low[0] <= truth <= iv.high[0])
    assert 0.93 <= covered / reps <= 0.97


def test_grouped_items_need_the_group_bootstrap():
    # 100 groups of 5 items; each group has its own accuracy ~ Beta(1.4, 0.6) (mean 0.7,
    # intra-group correlation 1/3), so item resampling underestimates the variance ~2.3x.
    truth, n_groups, size, reps = 0.7, 100, 5, 2000
    groups = np.repeat(np.arange(n_groups), size)
    rng = np.random.default_rng(321)
    by_group = by_item = 0
    for r in range(reps):
        p = np.repeat(rng.beta(1.4, 0.6, size=n_groups), size)
        correct = rng.random((n_groups * size, 1)) < p[:, None]
        g = accuracy_intervals(correct, n_resamples=200, seed=r, groups=groups)
        i = accuracy_intervals(correct, n_resamples=200, seed=r)
        by_group += bool(g.low[0] <= truth <= g.high[0])
        by_item += bool(i.low[0] <= truth <= i.high[0])
    assert 0.93 <= by_group / reps <= 0.97
    assert by_item / reps < 0.88


# ------------------------------------------------------------------------------ McNemar, Holm, Wilson


def test_mcnemar_by_hand():
    n = 50
    a = np.arange(n) < 30
    b = a.copy()
    b[[0, 1, 2, 3, 4]] = False  # a right, b wrong on 5 items
    b[[40, 41]] = True  # a wrong, b right on 2 items
    by_hand = 2 * sum(math.comb(7, i) for i in range(0, 3)) / 2**7  # 2 P(X <= 2), X ~ Bin(7, 1/2)
    assert by_hand == 58 / 128
    assert mcnemar_exact(a, b) == pytest.approx(by_hand)
    assert mcnemar_exact(b, a) == pytest.approx(by_hand)
    c = a.copy()
    c[:6] = False  # 6 discordant pairs, all one way
    assert mcnemar_exact(a, c) == pytest.approx(2 / 2**6)
    d = a.copy()
    d[[0, 40]] = [False, True]  # one each way: 2 P(X <= 1), X ~ Bin(2, 1/2) = 1.5, capped
    assert mcnemar_exact(a, d) == 1.0
    assert mcnemar_exact(a, a) == 1.0


def test_mcnemar_matches_statsmodels():
    contingency = pytest.importorskip("statsmodels.stats.contingency_tables")
    rng = np.random.default_rng(7)
    for _ in range(20):
        n = int(rng.integers(5, 300))
        a, b = rng.random(n) < rng.random(), rng.random(n) < rng.random()
        table = [[np.sum(a & b), np.sum(a & ~b)], [np.sum(~a & b), np.sum(~a & ~b)]]
        assert mcnemar_exact(a, b) == pytest.approx(contingency.mcnemar(table, exact=True).pvalue, rel=1e-12)


def test_holm_by_hand():
    got = holm([0.01, 0.04, 0.03, 0.005, np.nan])
    # sorted 0.005, 0.01, 0.03, 0.04 with m = 4: 4*0.005, 3*0.01, 2*0.03, max(1*0.04, 0.06)
    np.testing.assert_allclose(got, [0.03, 0.06, 0.06, 0.02, np.nan], rtol=1e-12)
    np.testing.assert_array_equal(holm([0.5, 0.6]), [1.0, 1.0])
    assert holm([]).shape == (0,)


def test_holm_matches_statsmodels():
    multitest = pytest.importorskip("statsmodels.stats.multitest")
    p = np.random.default_rng(1).random(17) ** 3
    np.testing.assert_allclose(holm(p), multitest.multipletests(p, method="holm")[1], rtol=1e-12)


def test_wilson_closed_form_and_edges():
    for k, n in [(7, 20), (0, 10), (10, 10), (1, 1), (523, 1000)]:
        centre = (k + Z95**2 / 2) / (n + Z95**2)
        half = Z95 / (n + Z95**2) * math.sqrt(k * (n - k) / n + Z95**2 / 4)
        low, high = wilson_interval(k, n)
        assert low == pytest.approx(max(0.0, centre - half), abs=1e-15)
        assert high == pytest.approx(min(1.0, centre + half), abs=1e-15)
    low, high = wilson_interval(np.array([0, 10, 0]), np.array([10, 10, 0]))
    assert low[0] == 0 and high[0] == pytest.approx(Z95**2 / (10 + Z95**2))
    assert high[1] == 1 and low[1] == pytest.approx(10 / (10 + Z95**2))
    assert np.isnan(low[2]) and np.isnan(high[2])
    with pytest.raises(EvaluationError):
        wilson_interval(5, 4)


# ------------------------------------------------------------------------------ balanced accuracy, macro-F1


def _labelled(seed, n=120):
    rng = np.random.default_rng(seed)
    y = rng.choice(np.array(["ant", "bee", "cicada", "dragonfly", "earwig"]), n, p=[0.4, 0.3, 0.15, 0.1, 0.05])
    pred = np.where(rng.random(n) < 0.6, y, rng.choice(np.array(["ant", "bee", "cicada", "flea"]), n))
    return y, pred


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_weighted_metrics_with_unit_weights_equal_sklearn():
    for seed in range(5):
        y, pred = _labelled(seed)
        ones = np.ones(len(y))
        assert weighted_balanced_accuracy(y, pred, ones) == pytest.approx(balanced_accuracy_score(y, pred), abs=1e-12)
        assert weighted_macro_f1(y, pred, ones) == pytest.approx(f1_score(y, pred, average="macro"), abs=1e-12)


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_weighted_metrics_with_integer_weights_equal_sklearn_on_the_repeated_sample():
    y, pred = _labelled(10)
    y[0], pred[0] = "gnat", "ant"  # one item only: gnat is left out of about a third of the resamples
    counts = resample_counts(len(y), 30, seed=4)
    assert 5 < (counts[:, 0] == 0).sum() < 25
    for w in counts:
        yy, pp = np.repeat(y, w), np.repeat(pred, w)
        assert weighted_balanced_accuracy(y, pred, w) == pytest.approx(balanced_accuracy_score(yy, pp), abs=1e-12)
        assert weighted_macro_f1(y, pred, w) == pytest.approx(f1_score(yy, pp, average="macro"), abs=1e-12)
    # [B, n] weights: one value per resample, equal to bootstrap_statistic's loop
    for fn in (weighted_balanced_accuracy, weighted_macro_f1):
        looped = bootstrap_statistic(lambda w: fn(y, pred, w), counts)
        np.testing.assert_allclose(fn(y, pred, counts), looped, atol=1e-12)


# ------------------------------------------------------------------------------ DeLong


def _delong_by_loops(y, scores_list):
    """AUCs and their DeLong covariance matrix, with psi(x, y) = 1, 1/2, 0 written out."""
    pos = [i for i in range(len(y)) if y[i]]
    neg = [j for j in range(len(y)) if not y[j]]
    m, n = len(pos), len(neg)

    def psi(a, b):
        return 1.0 if a > b else 0.5 if a == b else 0.0

    v10 = [[sum(psi(s[i], s[j]) for j in neg) / n for i in pos] for s in scores_list]
    v01 = [[sum(psi(s[i], s[j]) for i in pos) / m for j in neg] for s in scores_list]
    aucs = [sum(v) / m for v in v10]

    def cov(u, v):
        mu, mv = sum(u) / len(u), sum(v) / len(v)
        return sum((a - mu) * (b - mv) for a, b in zip(u, v)) / (len(u) - 1)

    K = len(scores_list)
    S = [[cov(v10[r], v10[s]) / m + cov(v01[r], v01[s]) / n for s in range(K)] for r in range(K)]
    return aucs, S


def test_delong_matches_loops_with_ties():
    rng = np.random.default_rng(2)
    y = rng.random(70) < 0.45
    a = np.round(y * 0.8 + rng.normal(size=70), 1)  # rounded: many ties, also across classes
    b = np.round(a + rng.normal(scale=0.7, size=70), 0)
    (auc_a, auc_b), S = _delong_by_loops(y, [a, b])
    got_auc, got_var = delong_auc(y, a)
    assert got_auc == pytest.approx(auc_a, abs=1e-12) and got_auc == pytest.approx(roc_auc_score(y, a), abs=1e-12)
    assert got_var == pytest.approx(S[0][0], rel=1e-10)
    assert delong_auc(y.astype(int), b)[1] == pytest.approx(S[1][1], rel=1e-10)
    diff, p = delong_paired_test(y, a, b)
    assert diff == pytest.approx(auc_a - auc_b, abs=1e-12)
    z = (auc_a - auc_b) / math.sqrt(S[0][0] + S[1][1] - 2 * S[0][1])
    assert p == pytest.approx(math.erfc(abs(z) / math.sqrt(2)), rel=1e-9)
    auc, low, high = delong_interval(y, a)
    assert (low, high) == pytest.approx((auc_a - Z95 * math.sqrt(S[0][0]), auc_a + Z95 * math.sqrt(S[0][0])))


def test_delong_variance_agrees_with_the_bootstrap():
    rng = np.random.default_rng(3)
    y = rng.random(300) < 0.3
    s = np.round(y + rng.normal(size=300), 1)
    auc, var = delong_auc(y, s)
    counts = resample_counts(len(y), 1000, seed=5, strata=y)  # DeLong holds the class sizes fixed
    boot = bootstrap_statistic(lambda w: roc_auc_score(y, s, sample_weight=w), counts)
    assert boot.std(ddof=1) == pytest.approx(math.sqrt(var), rel=0.08)
    assert boot.mean() == pytest.approx(auc, abs=0.01)


def test_delong_paired_test_and_one_class():
    rng = np.random.default_rng(8)
    y = rng.random(200) < 0.5
    good = y + rng.normal(scale=0.5, size=200)
    assert delong_paired_test(y, good, good) == (0.0, 1.0)
    assert delong_paired_test(y, good, 3 * good + 1) == (0.0, 1.0)  # same ranking
    diff, p = delong_paired_test(y, good, rng.normal(size=200))
    assert diff > 0.3 and p < 1e-6
    ones = np.ones(10, dtype=bool)
    assert all(math.isnan(v) for v in delong_auc(ones, np.arange(10.0)))
    assert all(math.isnan(v) for v in delong_interval(~ones, np.arange(10.0)))
    assert all(math.isnan(v) for v in delong_paired_test(ones, np.arange(10.0), np.arange(10.0)))


def test_bca_interval_is_scipys_bca_and_handles_degenerate_samples():
    from scipy import stats

    from nfhm_pipeline.evaluation.confidence import ConfidenceInputError, bca_interval

    rng = np.random.default_rng(3)
    x = rng.exponential(size=60)  # skewed: BCa moves the interval off the percentile one
    estimate, low, high = bca_interval(x, n_resamples=2000, seed=11)
    ref = stats.bootstrap((x,), np.mean, n_resamples=2000, method="BCa", vectorized=False,
                          random_state=np.random.default_rng(11)).confidence_interval
    assert (estimate, low, high) == (pytest.approx(x.mean()), pytest.approx(ref.low), pytest.approx(ref.high))
    percentile = stats.bootstrap((x,), np.mean, n_resamples=2000, method="percentile", vectorized=False,
                                 random_state=np.random.default_rng(11)).confidence_interval
    assert low != pytest.approx(percentile.low, abs=1e-6) and low < estimate < high
    assert bca_interval(np.ones(5)) == (1.0, 1.0, 1.0)  # every item a hit: no spread, no NaN
    for bad in ([], [0.5], [0.1, np.nan], np.ones((2, 2))):
        with pytest.raises(ConfidenceInputError):
            bca_interval(bad)
