"""The compiled CPU passes of the kNN (``knn_kernels``) against plain numpy, and the rankings they
give against the numpy passes they replace (``NFHM_KNN_NUMPY_PASSES=1``): identical answers,
including exact ties, single-image classes and classes split across train blocks."""
import numpy as np
import pytest

from nfhm_pipeline.evaluation import knn_kernels
from nfhm_pipeline.evaluation.knn import L2_RULES, RULES, nearest_neighbour_scores
from test_knn import clustered

pytestmark = pytest.mark.skipif(not knn_kernels.HAS_NUMBA, reason="numba is not installed (it comes with umap-learn)")

ALL_RULES = RULES + L2_RULES


def plain_reductions(St, starts, tn, qn):
    """The four per-class reductions written out in float64, one class (run of rows) at a time."""
    St = St.astype(np.float64)
    tn, qn = tn.astype(np.float64), qn.astype(np.float64)
    ends = list(starts[1:]) + [St.shape[0]]
    out = {"max": [], "min_e": [], "sum_d": [], "sum_l2": []}
    for a, e in zip(starts, ends):
        s, t = St[a:e], tn[a:e, None]
        e_part = t * t - 2 * t * s
        out["max"].append(s.max(axis=0))
        out["min_e"].append(e_part.min(axis=0))
        out["sum_d"].append(np.sqrt(np.maximum(e_part + qn**2, 0)).sum(axis=0))
        out["sum_l2"].append(np.sqrt(np.maximum(2 - 2 * s / qn, 0)).sum(axis=0))
    return {k: np.stack(v) for k, v in out.items()}


@pytest.mark.parametrize("w,b,starts", [
    (1, 1, [0]),                       # one train row, one test row
    (9, 5, [0, 1, 2, 5, 8]),           # single-row classes and a last class of one row
    (40, 100, [0, 3, 4, 20, 39]),      # more test rows than one thread's share: split at multiples of 16
    (64, 33, list(range(0, 64, 8))),
])
def test_fused_reductions_equal_a_plain_float64_computation(w, b, starts):
    rng = np.random.default_rng(w * 1000 + b)
    St = rng.normal(size=(w, b)).astype(np.float32)
    tn = (rng.random(w) + 0.5).astype(np.float32)
    qn = (rng.random(b) + 0.5).astype(np.float32)
    starts = np.array(starts)
    mx, mn, sd, sl = knn_kernels.fused_reduce(St, starts, tn * tn, tn * np.float32(-2), qn * qn,
                                              np.float32(-2) / qn, True, True)
    ref = plain_reductions(St, starts, tn, qn)
    np.testing.assert_array_equal(mx, ref["max"].astype(np.float32))  # a max is exact
    counts = np.diff(np.append(starts, w))[:, None]
    # float32 sums of n terms: off by at most about n units of roundoff, relative
    for got, key, scale in ((mn, "min_e", 1), (sd, "sum_d", counts), (sl, "sum_l2", counts)):
        bound = (scale + 8) * 2.0**-23 * np.abs(ref[key]) + 1e-6
        assert np.all(np.abs(got - ref[key]) <= bound), key


def test_only_the_asked_reductions_are_returned():
    St = np.ones((4, 3), dtype=np.float32)
    one = np.ones(4, dtype=np.float32)
    mx, mn, sd, sl = knn_kernels.fused_reduce(St, np.array([0, 2]), one, one, np.ones(3, np.float32),
                                              np.ones(3, np.float32), False, False)
    assert mx.shape == (2, 3) and mn is None and sd is None and sl is None


def test_the_switch_turns_the_fused_passes_off(monkeypatch):
    monkeypatch.setenv(knn_kernels.DISABLE_ENV, "1")
    assert not knn_kernels.available()
    monkeypatch.setenv(knn_kernels.DISABLE_ENV, "0")
    assert knn_kernels.available()


def rankings_both_ways(monkeypatch, train, labels, test, **kw):
    monkeypatch.delenv(knn_kernels.DISABLE_ENV, raising=False)
    fused = nearest_neighbour_scores(train, labels, test, device="cpu", **kw)
    monkeypatch.setenv(knn_kernels.DISABLE_ENV, "1")
    numpy_passes = nearest_neighbour_scores(train, labels, test, device="cpu", **kw)
    return fused, numpy_passes


@pytest.mark.parametrize("train_block_size,block_size", [(None, None), (7, 48), (1, 40), (23, 100)])
def test_fused_and_numpy_passes_give_identical_rankings(monkeypatch, train_block_size, block_size):
    train, labels, test = clustered(31, n_train=90, n_test=100, n_classes=7)
    ks = tuple(range(1, 8))
    fused, numpy_passes = rankings_both_ways(monkeypatch, train, labels, test, ks=ks, block_size=block_size,
                                             train_block_size=train_block_size)
    for rule in ALL_RULES:
        np.testing.assert_array_equal(fused.rankings[rule], numpy_passes.rankings[rule], err_msg=rule)


def test_fused_passes_keep_exact_ties_and_single_image_classes(monkeypatch):
    rng = np.random.default_rng(32)
    v = rng.normal(size=(5, 6)).astype(np.float32)
    # duplicated vectors in different classes (exact top-1 ties), tied class means ("m" and "k"
    # hold the same two vectors), and three classes of one image
    train = np.vstack([v[0], v[1], v[1], v[0], v[2], v[3], v[4], v[2]])
    labels = np.array(["m", "m", "k", "k", "one", "two", "three", "x"])
    test = np.vstack([v, 2 * v, rng.normal(size=(30, 6))]).astype(np.float32)
    ks = tuple(range(1, 7))
    for train_block_size in (None, 1, 3):
        fused, numpy_passes = rankings_both_ways(monkeypatch, train, labels, test, ks=ks,
                                                 train_block_size=train_block_size)
        for rule in ALL_RULES:
            np.testing.assert_array_equal(fused.rankings[rule], numpy_passes.rankings[rule],
                                          err_msg=f"{rule}, train blocks of {train_block_size}")
        assert "m" not in set(fused.labels("mean_cosine"))  # "k" sorts first among the tied means


@pytest.mark.parametrize("dim", [1, 5, 7, 8, 9, 16, 100, 127, 128, 129, 136, 255, 256, 300, 512, 768, 1000, 1024, 1536])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gathered_dots_are_bit_identical_to_numpy(dim, dtype):
    """The float64 repair's compiled dot products equal numpy's ``(X[items] * q).sum(axis=1)`` to
    the last bit, over numpy's pairwise-summation block sizes and magnitudes far apart."""
    rng = np.random.default_rng(dim)
    X = (rng.standard_normal((300, dim)) * 10.0 ** rng.integers(-6, 6, (300, 1))).astype(dtype)
    q = rng.standard_normal(dim) * 10.0 ** rng.integers(-3, 3, dim)
    items = rng.integers(0, 300, 2000)
    out = np.empty(len(items))
    knn_kernels.gathered_dots(X, items, q, out)
    np.testing.assert_array_equal(out, (X[items] * q).sum(axis=1))


def test_gathered_dots_read_a_memory_mapped_table(tmp_path):
    X = np.random.default_rng(0).standard_normal((50, 768)).astype(np.float32)
    mapped = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float32, shape=X.shape)
    mapped[:] = X
    q, items, out = np.linspace(-1, 1, 768), np.array([3, 3, 49, 0]), np.empty(4)
    assert knn_kernels.dots_usable(mapped)
    knn_kernels.gathered_dots(mapped, items, q, out)
    np.testing.assert_array_equal(out, (X[items] * q).sum(axis=1))
    assert out[0] == out[1]  # the same vector twice: the same value (exact ties stay ties)
