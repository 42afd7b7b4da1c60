"""Nearest-neighbour rules checked against a brute-force reference written with plain loops."""
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from nfhm_pipeline.errors import EvaluationError
from nfhm_pipeline.evaluation.knn import L2_RULES, RULES, nearest_neighbour_labels, nearest_neighbour_scores

SHARED_BENCH = Path(__file__).resolve().parents[2] / "shared" / "bench"


def brute_force_rankings(train, labels, test, normalize_euclidean=False):
    """{rule: list (one per test row) of all classes, best first}, with the documented tie rules:
    top1 rules rank a class by its best vector (ties: lowest train index), mean rules by the
    class mean (ties: sorted label order)."""
    train = [np.asarray(t, dtype=np.float64) for t in train]
    test = [np.asarray(q, dtype=np.float64) for q in test]
    classes = sorted(set(labels))

    def unit(v):
        return v / math.sqrt(sum(x * x for x in v))

    def euclidean(a, b):
        return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b)))

    out = {rule: [] for rule in RULES}
    for q in test:
        cos = [float(np.dot(unit(q), unit(t))) for t in train]
        if normalize_euclidean:
            neg_dist = [-euclidean(unit(q), unit(t)) for t in train]
        else:
            neg_dist = [-euclidean(q, t) for t in train]
        for name, score in (("cosine", cos), ("euclidean", neg_dist)):
            best, first, total, count = {}, {}, {}, {}
            for i, (label, value) in enumerate(zip(labels, score)):
                if label not in best or value > best[label]:
                    best[label], first[label] = value, i
                total[label] = total.get(label, 0.0) + value
                count[label] = count.get(label, 0) + 1
            out[f"top1_{name}"].append(sorted(classes, key=lambda c: (-best[c], first[c])))
            out[f"mean_{name}"].append(sorted(classes, key=lambda c: (-total[c] / count[c], classes.index(c))))
    return out


def brute_force_labels(train, labels, test, normalize_euclidean=False):
    rankings = brute_force_rankings(train, labels, test, normalize_euclidean)
    return {rule: [ranked[0] for ranked in rows] for rule, rows in rankings.items()}


def clustered(seed, n_train=60, n_test=25, dim=8, n_classes=5, dtype=np.float32):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim))
    train_class = rng.integers(0, n_classes, n_train)
    test_class = rng.integers(0, n_classes, n_test)
    train = (centres[train_class] + 0.8 * rng.normal(size=(n_train, dim))).astype(dtype)
    test = (centres[test_class] + 0.8 * rng.normal(size=(n_test, dim))).astype(dtype)
    labels = np.array(["Acer", "Betula", "Carex", "Draba", "Erica", "Ficus", "Galium"])[train_class]
    return train, labels, test


def assert_labels(ours, expected):
    for rule in RULES:
        assert list(ours[rule]) == expected[rule], rule


@pytest.mark.parametrize("block_size", [1, 3, None])
@pytest.mark.parametrize("seed", [0, 1])
def test_labels_match_brute_force_on_clustered_data(seed, block_size):
    train, labels, test = clustered(seed)
    ours = nearest_neighbour_labels(train, labels, test, block_size=block_size, device="cpu")
    assert_labels(ours, brute_force_labels(train, list(labels), test))


@pytest.mark.parametrize("block_size", [1, 3, None])
def test_normalize_euclidean_matches_brute_force_on_unit_vectors(block_size):
    train, labels, test = clustered(2)
    ours = nearest_neighbour_labels(train, labels, test, normalize_euclidean=True, block_size=block_size, device="cpu")
    assert_labels(ours, brute_force_labels(train, list(labels), test, normalize_euclidean=True))


@pytest.mark.parametrize("block_size", [1, 3, 1000])
def test_topk_rankings_match_brute_force(block_size):
    train, labels, test = clustered(3)
    ours = nearest_neighbour_scores(train, labels, test, ks=(1, 2, 3), block_size=block_size, device="cpu")
    expected = brute_force_rankings(train, list(labels), test)
    expected_l2 = brute_force_rankings(train, list(labels), test, normalize_euclidean=True)
    for rule in RULES + L2_RULES:
        reference = expected_l2[rule.removesuffix("_l2")] if rule.endswith("_l2") else expected[rule]
        got = [list(ours.classes[row]) for row in ours.rankings[rule]]
        assert got == [ranked[:3] for ranked in reference], rule


def test_top1_column_of_rankings_equals_nearest_neighbour_labels():
    train, labels, test = clustered(4)
    ranking = nearest_neighbour_scores(train, labels, test, device="cpu")
    raw = nearest_neighbour_labels(train, labels, test, device="cpu")
    l2 = nearest_neighbour_labels(train, labels, test, normalize_euclidean=True, device="cpu")
    for rule in RULES:
        np.testing.assert_array_equal(ranking.labels(rule), raw[rule])
    for rule in L2_RULES:
        np.testing.assert_array_equal(ranking.labels(rule), l2[rule.removesuffix("_l2")])


def test_duplicate_train_vectors_with_different_labels_go_to_lowest_train_index():
    train, labels, test = clustered(5)
    labels = labels.copy()
    train[7] = train[20]  # identical vectors, different labels; test rows equal to them tie exactly
    labels[7], labels[20] = "Ficus", "Galium"
    test = np.vstack([test, train[20], train[20] * 2])  # 2x: same cosine, different distance
    ours = nearest_neighbour_labels(train, labels, test, block_size=3, device="cpu")
    assert ours["top1_cosine"][-2] == ours["top1_cosine"][-1] == "Ficus"
    assert ours["top1_euclidean"][-2] == "Ficus"
    assert_labels(ours, brute_force_labels(train, list(labels), test))


def test_scaled_copies_tie_on_cosine_and_go_to_lowest_train_index():
    train = np.array([[1.0, 2.0, 0.5], [2.0, 4.0, 1.0], [-1.0, 0.0, 3.0]], dtype=np.float32)
    labels = np.array(["b", "a", "c"])
    ours = nearest_neighbour_labels(train, labels, np.array([[1.0, 1.0, 1.0]]), device="cpu")
    assert ours["top1_cosine"][0] == "b"


def test_equal_euclidean_distances_go_to_lowest_train_index():
    # integer vectors: q + e and q - e are at exactly the same distance from q
    q = np.array([[3.0, 1.0, 2.0]])
    e = np.array([1.0, -2.0, 1.0])
    train = np.vstack([q[0] + 5 * e, q[0] + e, q[0] - e, q[0] + 3 * e])
    labels = np.array(["x", "z", "y", "x"])
    ours = nearest_neighbour_labels(train, labels, q, device="cpu")
    assert ours["top1_euclidean"][0] == "z"
    assert_labels(ours, brute_force_labels(train, list(labels), q))


def test_tied_class_means_go_to_first_label_in_sorted_order():
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(2, 4))
    # classes "m" and "k" hold the same two vectors, so every mean ties; "k" sorts first
    train = np.vstack([x, y, y, x, x + 9]).astype(np.float32)
    labels = np.array(["m", "m", "k", "k", "z"])
    test = rng.normal(size=(6, 4)).astype(np.float32)
    ours = nearest_neighbour_labels(train, labels, test, device="cpu")
    expected = brute_force_labels(train, list(labels), test)
    assert_labels(ours, expected)
    assert "m" not in set(ours["mean_cosine"]) | set(ours["mean_euclidean"])


def test_near_ties_finer_than_float32_are_decided_in_float64():
    q = np.array([[1.0, 0.0, 0.0, 0.0]])
    v = np.array([0.3, 1.0, -0.5, 2.0])
    # the second vector is 1e-10 closer to q than the first: both round to the same float32
    train = np.vstack([v, v + 1e-10 * q[0], -v])
    labels = np.array(["a", "b", "c"])
    ranking = nearest_neighbour_scores(train, labels, q, device="cpu")
    for rule in RULES + L2_RULES:
        assert ranking.labels(rule)[0] == "b", rule
    assert ranking.n_exact_rows["top1_cosine"] == 1


def test_single_image_classes_give_the_same_answer_under_top1_and_mean_rules():
    rng = np.random.default_rng(7)
    train = rng.normal(size=(6, 5)).astype(np.float32)
    labels = np.array(["f", "e", "d", "c", "b", "a"])
    test = rng.normal(size=(10, 5)).astype(np.float32)
    ours = nearest_neighbour_labels(train, labels, test, device="cpu")
    np.testing.assert_array_equal(ours["top1_cosine"], ours["mean_cosine"])
    np.testing.assert_array_equal(ours["top1_euclidean"], ours["mean_euclidean"])
    assert_labels(ours, brute_force_labels(train, list(labels), test))


def test_one_class_only_predicts_it_and_ranks_one_class():
    train, _, test = clustered(8)
    ranking = nearest_neighbour_scores(train, np.full(len(train), 42), test, ks=(1, 5), device="cpu")
    for rule in RULES + L2_RULES:
        assert ranking.rankings[rule].shape == (len(test), 1)
        assert (ranking.labels(rule) == 42).all()


def test_k_larger_than_class_count_is_clipped_and_ranks_every_class():
    train, labels, test = clustered(9, n_classes=3)
    ranking = nearest_neighbour_scores(train, labels, test, ks=(1, 10), device="cpu")
    for rule in RULES + L2_RULES:
        assert ranking.rankings[rule].shape == (len(test), 3)
        assert all(sorted(row) == [0, 1, 2] for row in ranking.rankings[rule])


def test_mean_cosine_ranking_follows_brute_force_per_class_average():
    train, labels, test = clustered(10)
    ranking = nearest_neighbour_scores(train, labels, test, ks=(1, 2, 3, 4, 5), device="cpu")
    for row, q in enumerate(test.astype(np.float64)):
        average = {}
        for c in ranking.classes:
            members = train[labels == c].astype(np.float64)
            average[c] = np.mean([q @ t / (np.linalg.norm(q) * np.linalg.norm(t)) for t in members])
        assert list(ranking.classes[ranking.rankings["mean_cosine"][row]]) == sorted(average, key=lambda c: -average[c])


def test_labels_keep_the_dtype_of_train_labels():
    train, _, test = clustered(11)
    labels = np.arange(len(train)) % 4 * 10
    ours = nearest_neighbour_labels(train, labels, test, device="cpu")
    assert ours["top1_cosine"].dtype == labels.dtype
    assert set(ours["mean_euclidean"]) <= {0, 10, 20, 30}


def test_float64_inputs_are_not_modified():
    train, labels, test = clustered(12, dtype=np.float64)
    before = train.copy(), test.copy()
    nearest_neighbour_scores(train, labels, test, device="cpu")
    np.testing.assert_array_equal(train, before[0])
    np.testing.assert_array_equal(test, before[1])


def test_class_indices_map_unknown_labels_to_minus_one():
    train, labels, test = clustered(13, n_classes=3)
    ranking = nearest_neighbour_scores(train, labels, test, device="cpu")
    np.testing.assert_array_equal(ranking.class_indices(["Betula", "Zea", "Acer"]), [1, -1, 0])


def test_matches_the_shared_float64_reference_when_present():
    if not (SHARED_BENCH / "seed_knn.py").is_file():
        pytest.skip(f"{SHARED_BENCH} is absent")
    sys.path.insert(0, str(SHARED_BENCH))
    try:
        from seed_knn import reference_knn
    finally:
        sys.path.remove(str(SHARED_BENCH))
    train, labels, test = clustered(14, n_train=400, n_test=150, dim=32, n_classes=7)
    ours = nearest_neighbour_labels(train, labels, test, block_size=64, device="cpu")
    expected = reference_knn(train, labels, test)
    for rule in RULES:
        np.testing.assert_array_equal(ours[rule], expected[rule], err_msg=rule)


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="no CUDA device")
def test_cuda_gives_the_same_rankings_as_cpu():
    train, labels, test = clustered(15, n_train=500, n_test=200, dim=16)
    # every boundary requested, so the whole ranking is exact and must agree
    cpu = nearest_neighbour_scores(train, labels, test, ks=(1, 2, 3, 4, 5), device="cpu")
    gpu = nearest_neighbour_scores(train, labels, test, ks=(1, 2, 3, 4, 5), device="cuda")
    for rule in RULES + L2_RULES:
        np.testing.assert_array_equal(cpu.rankings[rule], gpu.rankings[rule], err_msg=rule)


@pytest.mark.parametrize(
    "train, labels, test, message",
    [
        (np.zeros((0, 3)), [], np.ones((2, 3)), "train has no rows"),
        (np.ones((2, 3)), ["a", "b"], np.zeros((0, 3)), "test has no rows"),
        (np.ones((2, 3)), ["a", "b"], np.ones((2, 4)), "dim 3 but test vectors dim 4"),
        (np.ones((2, 3)), ["a"], np.ones((2, 3)), "one label per train row"),
        (np.ones(3), ["a"], np.ones((2, 3)), "2-D array"),
        (np.array([[1.0, 1.0], [np.nan, 1.0]]), ["a", "b"], np.ones((1, 2)), "train row 1"),
        (np.ones((2, 2)), ["a", "b"], np.array([[1.0, 1.0], [1.0, np.inf]]), "test row 1"),
        (np.array([[1.0, 1.0], [0.0, 0.0]]), ["a", "b"], np.ones((1, 2)), "train row 1 is all zeros"),
        (np.ones((2, 2)), ["a", "b"], np.array([[1.0, 1.0], [1.0, 2.0], [0.0, 0.0]]), "test row 2 is all zeros"),
        (np.ones((2, 2)), np.array(["a", 1], dtype=object), np.ones((1, 2)), "cannot be sorted"),
    ],
)
def test_unusable_inputs_raise_evaluation_error_naming_the_problem(train, labels, test, message):
    with pytest.raises(EvaluationError, match=message):
        nearest_neighbour_labels(train, labels, test, block_size=2, device="cpu")


@pytest.mark.parametrize("ks", [(), (0, 3)])
def test_ks_without_a_positive_k_are_refused(ks):
    with pytest.raises(EvaluationError, match="ks must be one or more k >= 1"):
        nearest_neighbour_scores(np.ones((2, 2)), ["a", "b"], np.ones((1, 2)), ks=ks, device="cpu")


def test_each_requested_k_gives_exactly_the_brute_force_top_k_set():
    train, labels, test = clustered(17, n_train=80, n_test=40, n_classes=7)
    train[30] = train[5]  # a tie across classes
    ours = nearest_neighbour_scores(train, labels, test, ks=(1, 3, 5), block_size=4, device="cpu")
    assert ours.ks == (1, 3, 5)
    expected = brute_force_rankings(train, list(labels), test)
    for rule in RULES:
        for row, ranked in zip(ours.rankings[rule], expected[rule]):
            got = list(ours.classes[row])
            assert got[0] == ranked[0] and set(got[:3]) == set(ranked[:3]) and set(got) == set(ranked[:5]), rule


def test_topk_rankings_with_exact_ties_match_brute_force():
    rng = np.random.default_rng(16)
    v = rng.normal(size=(6, 5)).astype(np.float32)
    # every class shares its vectors with another class: ties at every rank, for every rule
    train = np.vstack([v[0], v[1], v[1], v[0], v[2], v[2], v[3], v[4], v[5], v[5], v[4], v[3]])
    labels = np.array(["B", "B", "A", "A", "D", "C", "E", "E", "F", "G", "G", "F"])
    test = np.vstack([rng.normal(size=(8, 5)), v[2], v[4]]).astype(np.float32)
    ours = nearest_neighbour_scores(train, labels, test, ks=(1, 2, 3, 4), block_size=3, device="cpu")
    expected = brute_force_rankings(train, list(labels), test)
    expected_l2 = brute_force_rankings(train, list(labels), test, normalize_euclidean=True)
    for rule in RULES + L2_RULES:
        reference = expected_l2[rule.removesuffix("_l2")] if rule.endswith("_l2") else expected[rule]
        got = [list(ours.classes[row]) for row in ours.rankings[rule]]
        assert got == [ranked[:4] for ranked in reference], rule
