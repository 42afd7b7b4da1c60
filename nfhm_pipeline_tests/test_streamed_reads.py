"""Evaluation reads the lake part by part (issue 15): ``EmbeddingStore.read(into=...)`` streams the
parts into a memory-mapped file and the kNN reads its train and test rows from it block by block
(``knn.Rows``). The answers must be the in-memory ones, bit for bit."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from nfhm_pipeline.errors import EvaluationError, StorageError
from nfhm_pipeline.evaluation.knn import Rows, nearest_neighbour_scores
from nfhm_pipeline.evaluation.tables import knn_tables
from nfhm_pipeline.store.embedding_store import EmbeddingStore, vector_file
from test_evaluation_defects import clustered_frame
from test_sharded_lake import embed, image_ids, write_single_file_table


def same_table(a, b) -> bool:
    return a.image_ids.tolist() == b.image_ids.tolist() and a.fingerprint == b.fingerprint and \
        np.array_equal(np.asarray(a.vectors).view(np.uint32), np.asarray(b.vectors).view(np.uint32))


@pytest.mark.parametrize("order", ["none", "shuffled", "prefix", "with_unknown_and_repeats"])
def test_a_mapped_read_equals_the_in_memory_read_and_leaves_no_file(tmp_path, order):
    store = EmbeddingStore(tmp_path / "lake")
    ids = image_ids(9_000)
    embed(store, ids)
    wanted = {"none": None, "shuffled": list(np.random.default_rng(1).permutation(ids)), "prefix": ids[5:30],
              "with_unknown_and_repeats": ["not-stored", ids[7], ids[7], *ids[100:90:-1]]}[order]
    folder = tmp_path / "vectors"
    mapped = store.read("d", "m", order=wanted, into=folder)
    assert isinstance(mapped.vectors, np.memmap) and not mapped.vectors.flags.writeable
    assert same_table(mapped, store.read("d", "m", order=wanted))
    assert list(folder.iterdir()) == []  # unlinked once mapped: nothing to clean up


def test_a_single_file_table_is_read_mapped_as_it_is(tmp_path):
    store = EmbeddingStore(tmp_path / "lake")
    ids = image_ids(700)
    vectors = write_single_file_table(store, ids, dim=5)
    mapped = store.read("d", "m", order=ids[::-1], into=tmp_path / "vectors")
    assert mapped.image_ids.tolist() == ids[::-1] and mapped.fingerprint == "fp"
    assert np.array_equal(mapped.vectors, vectors[::-1])


def test_a_file_left_by_a_killed_reader_is_deleted_and_a_live_ones_is_kept(tmp_path):
    folder = tmp_path / "vectors"
    folder.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    left = folder / f"d-m-{int(dead.stdout)}-0123abcd.npy"
    live = folder / f"d-m-{os.getpid()}-89abcdef.npy"
    left.write_bytes(b"x"), live.write_bytes(b"x")
    with vector_file(folder, "d-m") as fill:
        fill(3, 2)[:] = 1.0
        vectors = fill.done()
    assert not left.exists() and live.exists() and np.array_equal(vectors, np.ones((3, 2), np.float32))


def test_a_failure_while_filling_leaves_no_file(tmp_path):
    folder = tmp_path / "vectors"
    with pytest.raises(RuntimeError, match="boom"):
        with vector_file(folder, "d-m") as fill:
            fill(10, 4)
            raise RuntimeError("boom")
    assert list(folder.iterdir()) == []
    with pytest.raises(StorageError, match="no part"):
        with vector_file(folder, "d-m") as fill:
            fill.done()


def test_knn_over_row_views_of_a_mapped_table_equals_the_in_memory_arrays(tmp_path):
    rng = np.random.default_rng(5)
    n, dim = 3_000, 16
    classes = rng.integers(0, 40, n)
    base = (rng.normal(size=(40, dim))[classes] + rng.normal(size=(n, dim))).astype(np.float32)
    base[10] = base[11]  # an exact tie
    path = tmp_path / "table.npy"
    np.save(path, base)
    mapped = np.load(path, mmap_mode="r")
    tr, te = np.flatnonzero(np.arange(n) % 5 != 0), np.flatnonzero(np.arange(n) % 5 == 0)
    labels = classes[tr].astype(str)
    dense = nearest_neighbour_scores(base[tr], labels, base[te], ks=(1, 3, 5), device="cpu",
                                     block_size=128, train_block_size=500)
    view = nearest_neighbour_scores(Rows(mapped, tr), labels, Rows(mapped, te), ks=(1, 3, 5), device="cpu",
                                    block_size=128, train_block_size=500)
    assert dense.rankings.keys() == view.rankings.keys()
    for rule in dense.rankings:
        np.testing.assert_array_equal(dense.rankings[rule], view.rankings[rule])


def test_a_non_finite_row_of_a_view_is_named(tmp_path):
    base = np.ones((20_000, 3), dtype=np.float32)
    base[17_001] = np.nan
    with pytest.raises(EvaluationError, match="train row 17000 "):
        nearest_neighbour_scores(Rows(base, np.arange(1, 20_000)), np.zeros(19_999).astype(str),
                                 base[:5], device="cpu")


def test_knn_tables_on_a_mapped_table_equal_those_on_an_array(tmp_path):
    frame, vectors = clustered_frame(seed=2, n=120, n_classes=5)
    frame["group"] = np.where(np.arange(len(frame)) % 3 == 0, "north", "south")
    vectors[4] = 0.0
    np.save(tmp_path / "v.npy", vectors)
    mapped = np.load(tmp_path / "v.npy", mmap_mode="r")
    a = knn_tables(frame, vectors, ["species", "genus"], device="cpu")
    b = knn_tables(frame, mapped, ["species", "genus"], device="cpu")
    for x, y in zip(a.frames(), b.frames()):
        pd.testing.assert_frame_equal(x, y)


def test_the_float64_repair_in_small_chunks_gives_the_same_rankings(monkeypatch):
    from nfhm_pipeline.evaluation import knn

    rng = np.random.default_rng(8)
    # unstructured vectors on a coarse grid: many near-ties, so many rows go to the float64 repair
    train = rng.integers(-2, 3, size=(1_500, 6)).astype(np.float32)
    test = rng.integers(-2, 3, size=(300, 6)).astype(np.float32)
    labels = rng.integers(0, 30, 1_500).astype(str)
    whole = nearest_neighbour_scores(train, labels, test, ks=(1, 3, 5), device="cpu")
    assert sum(whole.n_exact_rows.values()) > 100
    monkeypatch.setattr(knn, "_REPAIR_PAIRS", 7)
    monkeypatch.setattr(knn, "_REPAIR_GATHER", 3)
    chunked = nearest_neighbour_scores(train, labels, test, ks=(1, 3, 5), device="cpu")
    for rule in whole.rankings:
        np.testing.assert_array_equal(whole.rankings[rule], chunked.rankings[rule])
