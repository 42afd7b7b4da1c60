"""The embedding maps' shared neighbour graph, stratified subsample, named grids and numba cache."""
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from nfhm_pipeline.catalog import DEFAULT_UMAP, load_catalog
from nfhm_pipeline.errors import CatalogError, EvaluationError
from nfhm_pipeline.reports.maps import (DEFAULT_GRID, GRIDS, SEED_001_GRID, exact_knn_graph, stratified_subsample,
                                        use_numba_cache)


# ---------------------------------------------------------------- the neighbour graph
def reference_knn(x: np.ndarray, k: int) -> tuple[list[list[int]], list[list[float]]]:
    """Plain exact cosine kNN: for every pair the squared cosine as a Fraction of the float32 values
    (exact, so ties are ties), the point itself first, then by distance, then by lower index.
    A zero vector is at distance 1 from every other vector and 0 from its copies (umap-learn's rule)."""
    rows = [[Fraction(float(v)) for v in row] for row in x]

    def cosine_key(a, b):  # orders like cos(a, b), exactly: sign(a.b) (a.b)^2 / (|a|^2 |b|^2)
        dot, na, nb = sum(p * q for p, q in zip(a, b)), sum(p * p for p in a), sum(q * q for q in b)
        if a == b:
            return Fraction(1)
        if na == 0 or nb == 0:
            return Fraction(0)
        return (1 if dot >= 0 else -1) * dot * dot / (na * nb)

    indices, distances = [], []
    for i, a in enumerate(rows):
        keys = [cosine_key(a, b) for b in rows]
        order = sorted(range(len(rows)), key=lambda j: (j != i, -keys[j], j))[:k]
        indices.append(order)
        distances.append([1 - np.sign(float(keys[j])) * np.sqrt(abs(float(keys[j]))) for j in order])
    return indices, distances


def tied_points() -> np.ndarray:
    """Random points plus exact ties: copies of a point, two points at the same angle from a third,
    a zero vector, and a group of copies larger than the k asked for."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(24, 6)).astype(np.float32)
    x[5] = x[2]                      # a pair of copies
    x[9] = x[2]                      # ... and a third copy, after another point
    x[10] = [3, 0, 0, 0, 0, 0]        # from this one, 11 and 12 lie at exactly the same angle
    x[11] = [3, 0.5, 0, 0, 0, 0]
    x[12] = [3, 0, 0.5, 0, 0, 0]
    x[13] = 0                        # a zero vector
    x[14:21] = x[0]                  # 8 copies of point 0 (rows 0, 14..20): more than k
    return x


def test_the_graph_equals_a_plain_exact_knn_with_ties_copies_and_a_zero_vector():
    x = tied_points()
    indices, distances = exact_knn_graph(x, 6, block_rows=5)  # blocks smaller than the collection
    ref_indices, ref_distances = reference_knn(x, 6)
    assert indices.dtype == np.int64 and distances.dtype == np.float32 and indices.shape == (24, 6)
    assert indices.tolist() == ref_indices
    np.testing.assert_allclose(distances, ref_distances, atol=1e-6)
    # the ties themselves, spelled out
    assert indices[2, :3].tolist() == [2, 5, 9] and distances[2, :3].tolist() == [0, 0, 0]
    assert indices[14].tolist() == [14, 0, 15, 16, 17, 18]  # itself first, then copies by index
    assert indices[10, 1:3].tolist() == [11, 12] and distances[10, 1] == distances[10, 2]
    assert indices[13, 0] == 13 and np.all(distances[13, 1:] == 1)


def test_the_graph_of_random_points_equals_the_reference():
    x = np.random.default_rng(0).normal(size=(40, 9)).astype(np.float32)
    indices, distances = exact_knn_graph(x, 12)
    ref_indices, ref_distances = reference_knn(x, 12)
    assert indices.tolist() == ref_indices
    np.testing.assert_allclose(distances, ref_distances, atol=1e-6)


def test_a_smaller_n_neighbors_is_the_first_columns_of_the_larger_graph():
    x = tied_points()  # includes a group of 8 copies, so the cut at k=3 falls inside a tie
    big_indices, big_distances = exact_knn_graph(x, 15)
    for k in (1, 3, 5, 8):
        indices, distances = exact_knn_graph(x, k)
        assert np.array_equal(big_indices[:, :k], indices)
        assert np.array_equal(big_distances[:, :k], distances)


def test_umaps_fuzzy_graph_from_the_sliced_graph_equals_umaps_own_exact_knn():
    # The shared graph cut to k gives UMAP the same fuzzy graph as UMAP's own exact kNN at k (its
    # small-data path: a full pairwise cosine matrix). No layout is fitted, only the graph.
    from nfhm_pipeline.reports.maps import import_umap

    umap = import_umap()
    from sklearn.metrics import pairwise_distances

    x = np.random.default_rng(1).normal(size=(60, 8)).astype(np.float32)
    indices, distances = exact_knn_graph(x, 15)
    state = np.random.RandomState(0)
    ours = umap.umap_.fuzzy_simplicial_set(x, 5, state, "cosine", knn_indices=indices[:, :5].copy(),
                                           knn_dists=distances[:, :5].copy())[0]
    theirs = umap.umap_.fuzzy_simplicial_set(pairwise_distances(x, metric="cosine"), 5, state, "precomputed")[0]
    assert (ours != 0).toarray().tolist() == (theirs != 0).toarray().tolist()
    np.testing.assert_allclose(ours.toarray(), theirs.toarray(), atol=1e-5)


def test_the_graph_refuses_a_k_beyond_the_points_and_non_finite_vectors():
    with pytest.raises(EvaluationError, match="k=5"):
        exact_knn_graph(np.ones((4, 2)), 5)
    with pytest.raises(EvaluationError, match="NaN or inf"):
        exact_knn_graph(np.array([[1.0, np.nan], [0.0, 1.0]]), 1)


# ---------------------------------------------------------------- the stratified subsample
def reference_allocation(sizes: dict, total: int) -> dict:
    """Plain largest-remainder allocation: one per class, the rest in proportion to (size - 1)."""
    rest, spare = total - len(sizes), {c: s - 1 for c, s in sizes.items()}
    shares = {c: Fraction(rest * s, sum(spare.values())) for c, s in spare.items()}
    take = {c: 1 + int(q) for c, q in shares.items()}
    by_remainder = sorted(sizes, key=lambda c: (-(shares[c] - int(shares[c])), c))
    for c in by_remainder[:total - sum(take.values())]:
        take[c] += 1
    return take


def test_the_subsample_keeps_every_class_in_proportion_and_is_deterministic():
    rng = np.random.default_rng(0)
    labels = np.array(["a"] * 700 + ["b"] * 230 + ["c"] * 60 + ["d"] * 9 + ["single"], dtype=object)
    labels = labels[rng.permutation(len(labels))]
    keep = stratified_subsample(labels, 100, seed=7)
    assert len(keep) == 100 and np.all(np.diff(keep) > 0)
    kept = dict(zip(*np.unique(labels[keep], return_counts=True)))
    assert kept == reference_allocation(dict(zip(*np.unique(labels, return_counts=True))), 100)
    assert kept["single"] == 1  # the one-image class is there
    assert np.array_equal(keep, stratified_subsample(labels, 100, seed=7))
    assert not np.array_equal(keep, stratified_subsample(labels, 100, seed=8))


def test_the_subsample_counts_missing_labels_as_a_class_and_keeps_small_collections_whole():
    labels = np.array(["a"] * 50 + [None] * 3 + ["b"] * 47, dtype=object)
    keep = stratified_subsample(labels, 20, seed=0)
    assert len(keep) == 20 and sum(labels[i] is None for i in keep) >= 1
    assert np.array_equal(stratified_subsample(labels, 100, seed=0), np.arange(100))


def test_with_more_classes_than_points_each_kept_class_gets_one_point():
    labels = np.repeat([f"c{i:02d}" for i in range(30)], 2)
    keep = stratified_subsample(labels, 12, seed=1)
    assert len(keep) == 12 and len(set(labels[keep])) == 12


def test_the_map_title_states_the_stratified_subsample():
    from nfhm_pipeline.reports.maps import umap_grid

    rng = np.random.default_rng(0)
    labels = {"species": np.array(["a"] * 45 + ["b"] * 4 + ["c"]), "genus": np.array(["g"] * 50)}
    fig = umap_grid(rng.normal(size=(50, 8)), labels, n_neighbors=(5,), min_dist=(0.1,), max_points=20, seed=3)
    title = " ".join(fig["genus"].get_suptitle().split())
    assert "subsample 20 of 50, seed 3, stratified by species" in title
    colours = fig["species"].axes[0].collections[0].get_facecolors()
    assert len(colours) == 20 and len({tuple(c) for c in colours}) == 3  # all three species drawn


# ---------------------------------------------------------------- the catalog's grids
CATALOG = """
datasets:
  birds:
    reader: image_folder
    root: images
    taxonomy: taxonomy.csv
    labels: [species, genus]
    {umap}
models:
  raw-pixels:
    loader: raw_pixels
"""


def load_umap(tmp_path: Path, umap_line: str) -> dict:
    path = tmp_path / "cat.yaml"
    path.write_text(CATALOG.format(umap=umap_line), encoding="utf-8")
    return load_catalog(path).datasets["birds"].umap


def test_the_catalog_default_is_the_small_grid(tmp_path):
    grid = load_umap(tmp_path, "")
    assert grid == DEFAULT_UMAP and grid["grid"] == "default"
    assert {k: tuple(v) for k, v in grid.items() if k in DEFAULT_GRID} == DEFAULT_GRID == GRIDS["default"]
    assert len(grid["n_neighbors"]) * len(grid["min_dist"]) == 6


def test_the_catalog_accepts_seed_001s_grid_by_name(tmp_path):
    grid = load_umap(tmp_path, "umap: {grid: seed, max_points: 5000}")
    assert grid["grid"] == "seed" and grid["max_points"] == 5000
    assert tuple(grid["n_neighbors"]) == SEED_001_GRID["n_neighbors"] and len(grid["n_neighbors"]) == 10
    assert tuple(grid["min_dist"]) == SEED_001_GRID["min_dist"]
    custom = load_umap(tmp_path, "umap: {n_neighbors: [3, 1000], min_dist: [0.0, 1.0]}")
    assert custom["grid"] == "custom" and custom["n_neighbors"] == [3, 1000]


@pytest.mark.parametrize("umap_line, message", [
    ("umap: {grid: everything}", "'umap.grid' must be one of \\['default', 'seed'\\]"),
    ("umap: {grid: seed, n_neighbors: [5]}", "both 'grid' and"),
    ("umap: seed", "umap: \\{grid: seed\\}"),
    ("umap: {neighbours: [5]}", "field 'umap' must be a mapping with keys"),
    ("umap: {n_neighbors: [1]}", "'umap.n_neighbors' values must be integers ≥ 2"),
    ("umap: {n_neighbors: []}", "'umap.n_neighbors' must be a non-empty list"),
    ("umap: {min_dist: [true]}", "'umap.min_dist' must be a non-empty list of numbers"),
    ("umap: {min_dist: [1.5]}", "'umap.min_dist' values must lie between 0 and 1"),
    ("umap: {max_points: 5}", "'umap.max_points' must be an integer ≥ 10"),
])
def test_the_catalog_refuses_a_nonsense_grid_naming_the_field(tmp_path, umap_line, message):
    with pytest.raises(CatalogError, match=message) as error:
        load_umap(tmp_path, umap_line)
    assert "birds" in str(error.value)


# ---------------------------------------------------------------- numba's cache folder
@pytest.fixture
def numba_settings(monkeypatch):
    """Undo what use_numba_cache changes: the variable, and numba's setting if numba is loaded."""
    import sys

    monkeypatch.delenv("NUMBA_CACHE_DIR", raising=False)
    if "numba" in sys.modules:
        config = sys.modules["numba"].config
        monkeypatch.setattr(config, "CACHE_DIR", config.CACHE_DIR)
    return monkeypatch


def test_the_numba_cache_goes_to_the_data_dir_unless_the_user_chose_one(tmp_path, numba_settings):
    import os

    assert use_numba_cache(tmp_path / "data" / "cache" / "numba") == tmp_path / "data" / "cache" / "numba"
    assert os.environ["NUMBA_CACHE_DIR"] == str(tmp_path / "data" / "cache" / "numba")
    assert (tmp_path / "data" / "cache" / "numba").is_dir()
    numba_settings.setenv("NUMBA_CACHE_DIR", str(tmp_path / "mine"))
    assert use_numba_cache(tmp_path / "other") == tmp_path / "mine"
    assert os.environ["NUMBA_CACHE_DIR"] == str(tmp_path / "mine") and not (tmp_path / "other").exists()
