"""kNN blocked over train rows as well as test rows: the same answers for every block size.

With every k requested (ks = 1..n_classes) a ranking is exact in every column, so the train-blocked
rankings must equal the one-block rankings and the brute-force reference entirely. With fewer ks
the guarantee is the top-k set at each requested k (and column 0); that is checked too.
"""
import numpy as np
import pytest

from nfhm_pipeline.errors import EvaluationError
from nfhm_pipeline.evaluation.knn import (L2_RULES, RULES, block_sizes, nearest_neighbour_labels,
                                          nearest_neighbour_scores)
from test_knn import brute_force_rankings, clustered

ALL_RULES = RULES + L2_RULES


def every_k(labels):
    return tuple(range(1, len(set(labels)) + 1))


def reference(train, labels, test):
    raw = brute_force_rankings(train, list(labels), test)
    l2 = brute_force_rankings(train, list(labels), test, normalize_euclidean=True)
    return {rule: (l2[rule.removesuffix("_l2")] if rule.endswith("_l2") else raw[rule]) for rule in ALL_RULES}


def assert_same_rankings(a, b):
    np.testing.assert_array_equal(a.classes, b.classes)
    assert a.ks == b.ks
    for rule in ALL_RULES:
        np.testing.assert_array_equal(a.rankings[rule], b.rankings[rule], err_msg=rule)


def assert_matches_reference(ranking, expected):
    for rule in ALL_RULES:
        got = [list(ranking.classes[row]) for row in ranking.rankings[rule]]
        assert got == [ranked[: ranking.rankings[rule].shape[1]] for ranked in expected[rule]], rule


# 60 train rows, 5 classes of ~12 rows: 1 and 2 split every class, 7 and 13 split classes at odd
# places, 59 leaves one row for a second block, 60 and 1000 are one block.
@pytest.mark.parametrize("train_block_size", [1, 2, 7, 13, 59, 60, 1000])
def test_train_blocked_rankings_equal_one_block_and_brute_force(train_block_size):
    train, labels, test = clustered(20)
    ks = every_k(labels)
    one = nearest_neighbour_scores(train, labels, test, ks=ks, device="cpu")
    blocked = nearest_neighbour_scores(train, labels, test, ks=ks, block_size=4, train_block_size=train_block_size,
                                       device="cpu")
    assert_same_rankings(blocked, one)
    assert_matches_reference(blocked, reference(train, labels, test))


@pytest.mark.parametrize("train_block_size", [1, 5, 17])
def test_requested_top_k_sets_do_not_depend_on_the_train_block_size(train_block_size):
    train, labels, test = clustered(21, n_train=90, n_test=40, n_classes=7)
    one = nearest_neighbour_scores(train, labels, test, ks=(1, 3, 5), device="cpu")
    blocked = nearest_neighbour_scores(train, labels, test, ks=(1, 3, 5), block_size=7,
                                       train_block_size=train_block_size, device="cpu")
    for rule in ALL_RULES:
        for k in (1, 3, 5):
            np.testing.assert_array_equal(np.sort(blocked.rankings[rule][:, :k], axis=1),
                                          np.sort(one.rankings[rule][:, :k], axis=1), err_msg=f"{rule} k={k}")


def test_exact_ties_across_a_train_block_boundary_go_to_the_lowest_train_index():
    rng = np.random.default_rng(22)
    v = rng.normal(size=(4, 6)).astype(np.float32)
    # class order: A (rows 0, 3), B (rows 1, 4), C (rows 2, 5). The same vector sits in A at train
    # index 3 and in B at index 1, and with blocks of 2 in class order (A A | B B | C C) the two
    # copies fall in different blocks; class C holds two copies of one vector, split the same way.
    train = np.vstack([v[0], v[1], v[2], v[1], v[3], v[2]])
    labels = np.array(["A", "B", "C", "A", "B", "C"])
    test = np.vstack([v[1], 3 * v[1], v[2], rng.normal(size=(5, 6))]).astype(np.float32)
    for train_block_size in (1, 2, 3, 4):
        ours = nearest_neighbour_labels(train, labels, test, train_block_size=train_block_size, device="cpu")
        # the copy at train index 1 (class B) comes before the one at index 3 (class A)
        assert ours["top1_cosine"][0] == ours["top1_cosine"][1] == "B"
        assert ours["top1_euclidean"][0] == "B"
        expected = reference(train, labels, test)
        for rule in RULES:
            assert list(ours[rule]) == [ranked[0] for ranked in expected[rule]], (rule, train_block_size)
        ranking = nearest_neighbour_scores(train, labels, test, ks=(1, 2, 3), train_block_size=train_block_size,
                                           device="cpu")
        assert_matches_reference(ranking, expected)


def test_tied_class_means_across_blocks_go_to_the_first_label():
    rng = np.random.default_rng(23)
    x, y = rng.normal(size=(2, 4))
    # "k" and "m" hold the same two vectors (every mean ties); blocks of 1 and 3 split both
    train = np.vstack([x, y, y, x, x + 9, x - 9]).astype(np.float32)
    labels = np.array(["m", "m", "k", "k", "z", "z"])
    test = rng.normal(size=(6, 4)).astype(np.float32)
    for train_block_size in (1, 3):
        ranking = nearest_neighbour_scores(train, labels, test, ks=(1, 2, 3), train_block_size=train_block_size,
                                           device="cpu")
        assert_matches_reference(ranking, reference(train, labels, test))
        for rule in ("mean_cosine", "mean_euclidean", "mean_euclidean_l2"):
            assert "m" not in set(ranking.labels(rule)), rule


@pytest.mark.parametrize("train_block_size", [1, 2, 4])
def test_single_image_classes_in_blocks_match_brute_force(train_block_size):
    rng = np.random.default_rng(24)
    train = rng.normal(size=(7, 5)).astype(np.float32)
    labels = np.array(["g", "f", "e", "d", "c", "b", "a"])
    test = rng.normal(size=(9, 5)).astype(np.float32)
    ks = every_k(labels)
    blocked = nearest_neighbour_scores(train, labels, test, ks=ks, block_size=2, train_block_size=train_block_size,
                                       device="cpu")
    assert_same_rankings(blocked, nearest_neighbour_scores(train, labels, test, ks=ks, device="cpu"))
    assert_matches_reference(blocked, reference(train, labels, test))
    np.testing.assert_array_equal(blocked.rankings["top1_cosine"], blocked.rankings["mean_cosine"])


def test_near_ties_finer_than_float32_are_decided_in_float64_when_blocked():
    q = np.array([[1.0, 0.0, 0.0, 0.0]])
    v = np.array([0.3, 1.0, -0.5, 2.0])
    # "b" is 1e-10 closer than "a": one float32; "a" and "b" in different train blocks of 1
    train = np.vstack([v, v + 1e-10 * q[0], -v, -v + 1e-3])
    labels = np.array(["a", "b", "c", "c"])
    ranking = nearest_neighbour_scores(train, labels, q, train_block_size=1, device="cpu")
    for rule in ALL_RULES:
        assert ranking.labels(rule)[0] == "b", rule
    assert ranking.n_exact_rows["top1_cosine"] == 1


def test_a_class_spanning_many_blocks_with_float64_inputs():
    train, labels, test = clustered(25, n_train=50, n_test=12, n_classes=2, dtype=np.float64)
    ks = every_k(labels)
    blocked = nearest_neighbour_scores(train, labels, test, ks=ks, train_block_size=3, device="cpu")
    assert_same_rankings(blocked, nearest_neighbour_scores(train, labels, test, ks=ks, device="cpu"))
    assert_matches_reference(blocked, reference(train, labels, test))


def test_progress_counts_every_test_and_train_block_pair():
    train, labels, test = clustered(26)  # 60 train, 25 test
    calls = []
    nearest_neighbour_scores(train, labels, test, block_size=10, train_block_size=25, device="cpu",
                             progress=lambda done, total: calls.append((done, total)))
    assert calls == [(i, 9) for i in range(1, 10)]  # 3 test blocks x 3 train blocks
    calls.clear()
    nearest_neighbour_labels(train, labels, test, device="cpu", progress=lambda d, t: calls.append((d, t)))
    assert calls == [(1, 1)]  # small inputs: one block of each


def test_default_blocks_keep_small_collections_in_one_train_block_and_bound_large_ones():
    assert block_sizes(30_000, 5_000, 200, "cpu") == (559, 30_000)  # the unblocked computation
    test_rows, train_rows = block_sizes(900_000, 100_000, 2_000, "cpu")
    assert train_rows < 900_000 and test_rows * train_rows <= 1 << 24
    test_rows, _ = block_sizes(900_000, 100_000, 500_000, "cpu")
    assert test_rows * 500_000 <= 1 << 24 or test_rows == 16  # the [block, n_classes] accumulators too
    assert block_sizes(100, 10, 5, "cpu", block_size=3, train_block_size=7) == (3, 7)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "8"])
def test_unusable_block_sizes_are_refused(bad):
    train, labels, test = clustered(27)
    with pytest.raises(EvaluationError, match="train_block_size must be a whole number >= 1"):
        nearest_neighbour_scores(train, labels, test, train_block_size=bad, device="cpu")
    with pytest.raises(EvaluationError, match="block_size must be a whole number >= 1"):
        nearest_neighbour_labels(train, labels, test, block_size=bad, device="cpu")
