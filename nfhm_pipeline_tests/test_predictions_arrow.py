"""``predictions`` as Arrow blocks (issue 15): one block per (task, level, grp, rule), written to the
warehouse by appending block after block inside the one transaction, never concatenated.

Checked on a real DuckDB file against a plainly built pandas frame of the same rows."""
from __future__ import annotations

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from helpers import write_results
from nfhm_pipeline.errors import StorageError
from nfhm_pipeline.evaluation.tables import (EvalTables, knn_tables, part_task, prediction_frame, prediction_part,
                                             probe_tables, with_constants)
from nfhm_pipeline.store import warehouse
from test_evaluation_defects import clustered_frame

COLUMNS = ["task", "level", "grp", "rule", "image_id", "true_label", "predicted_label"]


def stored(db, sql="SELECT * FROM predictions"):
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute(sql).df()
    finally:
        con.close()


def sorted_rows(frame: pd.DataFrame, columns) -> list[tuple]:
    return sorted(tuple(None if pd.isna(v) else v for v in row) for row in frame[columns].itertuples(index=False))


def test_a_block_holds_exactly_the_rows_it_was_given_with_no_prediction_as_null():
    ids = np.array(["a", "b", "c", "d"], dtype=object)
    true = np.array(["acer", "acer", "betula", "quercus"])
    pred = np.array(["acer", None, "betula", "acer"], dtype=object)
    part = prediction_part("knn", "species", "all", "top1_cosine", ids, true, pred)
    assert part.num_rows == 4 and part_task(part) == "knn"
    assert pa.types.is_dictionary(part.column("true_label").type)  # compact: indices + the distinct labels
    frame = prediction_frame(part)
    expected = pd.DataFrame({"task": "knn", "level": "species", "grp": "all", "rule": "top1_cosine",
                             "image_id": ids, "true_label": true, "predicted_label": pred})
    assert sorted_rows(frame, COLUMNS) == sorted_rows(expected, COLUMNS)
    assert pd.isna(frame["predicted_label"].iloc[1]) and frame["predicted_label"].notna().sum() == 3
    empty = prediction_part("linear_probe", "genus", "all", "linear_svc", np.array([], dtype=object), [], [])
    assert empty.num_rows == 0 and part_task(empty) == "linear_probe"


def test_constants_are_added_and_none_is_null():
    part = prediction_part("knn", "species", "all", "top1_cosine", np.array(["a", "b"]), ["x", "y"], ["x", "x"])
    out = prediction_frame(with_constants(part, {"dataset": "d", "split_id": None}))
    assert list(out["dataset"]) == ["d", "d"] and out["split_id"].isna().all()


def test_blocks_are_appended_in_one_transaction_and_replace_the_old_rows(tmp_path):
    db = tmp_path / "warehouse.duckdb"
    where = {"dataset": "d", "model": "m", "task": "knn"}
    extra = {"dataset": "d", "model": "m", "run_id": "r1", "split_id": "s1"}
    rng = np.random.default_rng(0)
    blocks, frames = [], []
    for rule in ("top1_cosine", "mean_cosine", "top1_euclidean"):
        n = int(rng.integers(1, 50))
        ids = np.array([f"img{i}" for i in range(n)], dtype=object)
        true = rng.choice(["acer", "betula", "quercus"], n)
        pred = np.where(rng.random(n) < 0.2, None, rng.choice(["acer", "betula"], n)).astype(object)
        blocks.append(with_constants(prediction_part("knn", "species", "all", rule, ids, true, pred), extra))
        frames.append(pd.DataFrame({"task": "knn", "level": "species", "grp": "all", "rule": rule, "image_id": ids,
                                    "true_label": true, "predicted_label": pred, **extra}))
    old = frames[0].assign(run_id="r0")
    warehouse.replace_many(db, [("predictions", old, where)])  # a pandas frame still works
    inserted = warehouse.replace_many(db, [("predictions", blocks, where)])
    expected = pd.concat(frames, ignore_index=True)
    assert inserted == len(expected)
    columns = [*COLUMNS, "dataset", "model", "run_id", "split_id"]
    assert sorted_rows(stored(db), columns) == sorted_rows(expected, columns)

    # a block with a column the table lacks: nothing is written, the stored rows stay
    bad = blocks[0].append_column("nonsense", pa.array(["x"] * blocks[0].num_rows))
    with pytest.raises(StorageError, match="nonsense"):
        warehouse.replace_many(db, [("predictions", [blocks[1], bad], where)])
    assert sorted_rows(stored(db), columns) == sorted_rows(expected, columns)

    # a failure inside the transaction (a block with no image_id, a NOT NULL key) rolls every block back
    broken = pa.table({**{c: blocks[1].column(c) for c in blocks[1].column_names if c != "image_id"},
                       "image_id": pa.nulls(blocks[1].num_rows, pa.string())})
    with pytest.raises(StorageError):
        warehouse.replace_many(db, [("predictions", [blocks[2], broken], where)])
    assert sorted_rows(stored(db), columns) == sorted_rows(expected, columns)

    # no block: the task's rows are cleared
    warehouse.replace_many(db, [("predictions", [], where)])
    assert stored(db).empty


def test_stored_predictions_equal_the_evaluation_frames(tmp_path):
    frame, vectors = clustered_frame(seed=3, n=80, n_classes=4)
    frame["group"] = np.where(np.arange(len(frame)) % 2 == 0, "north", "south")
    frame.loc[frame.index[:3], "species"] = None  # rows without a label: left out, not predicted
    vectors[5] = 0.0  # a zero test/train vector: no prediction (NULL) when on the test side
    tables = knn_tables(frame, vectors, ["species", "genus"], device="cpu")
    probes = probe_tables(frame, vectors, ["species"], seed=0, n_jobs=1)
    merged = EvalTables(metrics=[*tables.metrics, *probes.metrics], per_class=[*tables.per_class, *probes.per_class],
                        predictions=[*tables.predictions, *probes.predictions])
    expected = merged.frames()[2]
    assert len(expected) and set(expected["task"]) == {"knn", "linear_probe", "logistic_probe"}
    write_results(tmp_path / "warehouse.duckdb", "d", "m", merged, split_id="s1")
    rows = stored(tmp_path / "warehouse.duckdb")
    assert set(rows["run_id"]) == {"test-run"} and set(rows["split_id"]) == {"s1"}
    assert sorted_rows(rows, COLUMNS) == sorted_rows(expected, COLUMNS)
    # each (task, level, grp, rule) was one block: groups in the table are those blocks exactly
    assert len(merged.predictions) == len(expected.groupby(["task", "level", "grp", "rule"]))
