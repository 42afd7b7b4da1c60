"""The DuckDB warehouse: replace-by-key writes, read-only queries, parameters never spliced into SQL."""
import multiprocessing as mp

import pandas as pd
import pytest

from nfhm_pipeline.errors import StorageError
from nfhm_pipeline.store import warehouse


def metrics_rows(dataset, model, value, n=3):
    return pd.DataFrame({"dataset": dataset, "model": model, "task": "knn", "level": "species", "grp": "all",
                         "metric": [f"m{i}" for i in range(n)], "value": value})


def test_replace_rows_replaces_only_the_matching_key(tmp_path):
    db = tmp_path / "w.duckdb"
    warehouse.replace_rows(db, "metrics", metrics_rows("d", "a", 0.1), dataset="d", model="a")
    warehouse.replace_rows(db, "metrics", metrics_rows("d", "b", 0.2), dataset="d", model="b")
    warehouse.replace_rows(db, "metrics", metrics_rows("d", "a", 0.9, n=2), dataset="d", model="a")
    out = warehouse.read_table(db, "metrics", dataset="d")
    assert sorted(out.groupby("model").size().items()) == [("a", 2), ("b", 3)]
    assert set(out.loc[out["model"] == "a", "value"]) == {0.9}


def test_hostile_identifiers_are_data_not_sql(tmp_path):
    db = tmp_path / "w.duckdb"
    evil = "x'; DROP TABLE metrics; --"
    warehouse.replace_rows(db, "metrics", metrics_rows(evil, "a", 0.5), dataset=evil, model="a")
    assert len(warehouse.read_table(db, "metrics", dataset=evil)) == 3


def test_sql_queries_are_read_only(tmp_path):
    db = tmp_path / "w.duckdb"
    warehouse.replace_rows(db, "metrics", metrics_rows("d", "a", 0.5), dataset="d", model="a")
    assert warehouse.query(db, "SELECT count(*) AS n FROM metrics")["n"][0] == 3
    with pytest.raises(StorageError, match="query failed"):
        warehouse.query(db, "DELETE FROM metrics")


def test_query_on_a_missing_warehouse_says_what_to_do(tmp_path):
    with pytest.raises(StorageError, match="make demo"):
        warehouse.query(tmp_path / "none.duckdb", "SELECT 1")


def test_unknown_column_is_refused(tmp_path):
    with pytest.raises(StorageError, match="no column"):
        warehouse.replace_rows(tmp_path / "w.duckdb", "metrics", pd.DataFrame({"bogus": [1]}))


def _writer(db, model):
    for i in range(5):
        warehouse.replace_rows(db, "metrics", metrics_rows("d", f"{model}-{i}", 0.5), dataset="d", model=f"{model}-{i}")


def test_two_processes_writing_at_once_lose_no_rows(tmp_path):
    db = str(tmp_path / "w.duckdb")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(db, m)) for m in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert len(warehouse.read_table(db, "metrics")) == 2 * 5 * 3


def test_every_declared_table_is_created_with_its_columns_types_and_not_nulls_in_order(tmp_path):
    from nfhm_pipeline.store.schemas import WAREHOUSE_TABLES

    db = tmp_path / "w.duckdb"
    with warehouse.connect(db) as con:
        warehouse.ensure_schema(con)
        rows = con.execute("SELECT table_name, column_name, data_type, is_nullable FROM information_schema.columns "
                           "WHERE table_schema = 'main' ORDER BY table_name, ordinal_position").fetchall()
    got: dict[str, list] = {}
    for table, column, dtype, nullable in rows:
        got.setdefault(table, []).append((column, dtype, nullable == "YES"))
    want = {t: [(c.name, c.type, c.nullable) for c in cols] for t, cols in WAREHOUSE_TABLES.items()}
    assert got == want
    assert warehouse.table_columns("runs")[:4] == ["dataset", "model", "task", "run_id"]


def test_a_column_declared_since_an_older_warehouse_is_added_as_null(tmp_path):
    import duckdb

    db = tmp_path / "w.duckdb"
    con = duckdb.connect(str(db))
    con.execute("CREATE TABLE split_exclusions (dataset VARCHAR NOT NULL, image_id VARCHAR NOT NULL)")
    con.execute("INSERT INTO split_exclusions VALUES ('d', 'i')")
    con.close()
    warehouse.replace_rows(db, "split_exclusions", pd.DataFrame({"dataset": ["e"], "image_id": ["j"],
                                                                 "reason": ["r"]}), dataset="e")
    out = warehouse.read_table(db, "split_exclusions").sort_values("dataset")
    assert list(out.columns) == ["dataset", "image_id", "label", "reason"]
    assert out["reason"].isna().tolist() == [True, False] and out["reason"].iloc[1] == "r"


def test_an_unknown_table_is_refused(tmp_path):
    from nfhm_pipeline.store.schemas import create_table_sql

    with pytest.raises(StorageError, match="unknown warehouse table 'nope'"):
        create_table_sql("nope")
