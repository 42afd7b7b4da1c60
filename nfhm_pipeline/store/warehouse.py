"""The DuckDB warehouse: one file, tables declared in :mod:`schemas`.

DuckDB locks the file per process (readers too), so a connection is held only
for the duration of one write or one query, and opening retries briefly when
another process holds the lock. Identifiers (dataset and model names) are only
ever passed as bound parameters, never spliced into SQL.
"""
from __future__ import annotations

import contextlib
import re
import time
from pathlib import Path
from typing import Iterator

import pandas as pd

from nfhm_pipeline.errors import StorageError
from nfhm_pipeline.store.remote import is_remote, lake_dataset, redact
from nfhm_pipeline.store.schemas import WAREHOUSE_DDL, table_columns

_LOCK_MARKERS = ("Could not set lock", "Conflicting lock", "database is locked")


@contextlib.contextmanager
def connect(path: str | Path, *, read_only: bool = False, timeout_s: float = 60.0) -> Iterator["duckdb.DuckDBPyConnection"]:
    """Open the warehouse, retrying while another process holds its lock."""
    import duckdb

    path = Path(path)
    if read_only and not path.exists():
        raise StorageError(f"warehouse {path} does not exist yet: materialize the assets first (make demo)")
    if not read_only:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create the data folder {path.parent}: {exc.strerror}; "
                               "set NFHM_DATA_DIR to a writable folder") from None
    deadline = time.monotonic() + timeout_s
    delay = 0.05
    while True:
        try:
            con = duckdb.connect(str(path), read_only=read_only)
            break
        except duckdb.IOException as exc:
            msg = str(exc)
            if any(m in msg for m in _LOCK_MARKERS) and time.monotonic() < deadline:
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            if any(m in msg for m in _LOCK_MARKERS):
                raise StorageError(f"warehouse {path} is locked by another process for more than "
                                   f"{timeout_s:.0f} s (a running materialization?); try again when it ends") from None
            raise StorageError(f"cannot open warehouse {path}: {msg}") from None
    try:
        yield con
    finally:
        con.close()


def ensure_schema(con) -> None:
    for table, ddl in WAREHOUSE_DDL.items():
        con.execute(f"CREATE TABLE IF NOT EXISTS {table} ({ddl})")


def _checked_columns(table: str, where: dict) -> list[str]:
    """The columns of ``table``, after checking that it and the ``where`` keys are declared ones:
    table and column names are spliced into SQL, so only names from schemas.py may get there."""
    if table not in WAREHOUSE_DDL:
        raise StorageError(f"unknown warehouse table {table!r}; tables: {sorted(WAREHOUSE_DDL)}")
    columns = table_columns(table)
    unknown = [col for col in where if col not in columns]
    if unknown:
        raise StorageError(f"table {table} has no column(s) {unknown} to select rows by")
    return columns


def replace_rows(path: str | Path, table: str, frame: pd.DataFrame, **where: str) -> int:
    """Atomically replace the rows of ``table`` matching ``where`` (column = value) by ``frame``.

    Missing columns of ``frame`` are filled with NULL; extra columns are an error.
    Returns the number of rows inserted.
    """
    columns = _checked_columns(table, where)
    extra = set(frame.columns) - set(columns)
    if extra:
        raise StorageError(f"table {table} has no column(s) {sorted(extra)}")
    frame = frame.reindex(columns=columns)
    import duckdb

    with connect(path) as con:
        ensure_schema(con)
        con.execute("BEGIN TRANSACTION")
        try:
            if where:
                cond = " AND ".join(f"{col} = ?" for col in where)
                con.execute(f"DELETE FROM {table} WHERE {cond}", list(where.values()))
            if len(frame):
                con.register("incoming", frame)
                con.execute(f"INSERT INTO {table} SELECT * FROM incoming")
                con.unregister("incoming")
            con.execute("COMMIT")
        except Exception as exc:
            with contextlib.suppress(Exception):  # after a failed write the transaction may be gone already
                con.execute("ROLLBACK")
            if isinstance(exc, duckdb.Error):
                raise StorageError(f"cannot write table {table} of warehouse {path}: {exc}; check that the "
                                   "data folder is writable and has free space") from None
            raise
    return len(frame)


def append_rows(path: str | Path, table: str, frame: pd.DataFrame) -> int:
    return replace_rows(path, table, frame)


def query(path: str | Path, sql: str, params: list | None = None, *, lake_root: str | None = None) -> pd.DataFrame:
    """Run one read-only query and return a DataFrame.

    When the embedding lake is remote (``lake_root``, else the root the last embedding run
    recorded) and the query names ``embeddings``, the lake is registered under that name for this
    session as a pyarrow dataset: DuckDB then needs no httpfs extension to read object storage.
    """
    import duckdb

    with connect(path, read_only=True) as con:
        try:
            root = lake_root or _recorded_lake_root(con)
            if is_remote(root) and re.search(r"\bembeddings\b", sql, re.IGNORECASE):
                con.register("embeddings", lake_dataset(root))
            return con.execute(sql, params or []).df()
        except duckdb.Error as exc:
            raise StorageError(f"query failed: {exc}") from None


def read_table(path: str | Path, table: str, **where: str) -> pd.DataFrame:
    """All rows of ``table`` matching ``where``; an empty frame with the right columns if none."""
    _checked_columns(table, where)
    cond = " AND ".join(f"{col} = ?" for col in where)
    sql = f"SELECT * FROM {table}" + (f" WHERE {cond}" if cond else "")
    if not Path(path).exists():
        return pd.DataFrame(columns=table_columns(table))
    with connect(path, read_only=True) as con:
        exists = con.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [table]).fetchone()[0]
        if not exists:
            return pd.DataFrame(columns=table_columns(table))
        return con.execute(sql, list(where.values())).df()


def refresh_embedding_view(path: str | Path, lake_root: str) -> None:
    """(Re)create the view ``embeddings`` over every embedding Parquet file in a local lake.

    Columns: image_id, embedding, dataset, model (the last two from the hive-style folders).
    The lake root (without secrets) is recorded in the view ``nfhm_lake``; a remote lake gets no
    persistent view (it would need DuckDB's httpfs): :func:`query` registers it per session.
    """
    with connect(path) as con:
        ensure_schema(con)
        con.execute(f"CREATE OR REPLACE VIEW nfhm_lake AS SELECT '{_quote_literal(redact(lake_root))}' AS root")
        if is_remote(lake_root):
            con.execute("DROP VIEW IF EXISTS embeddings")
            return
        pattern = f"{str(lake_root).rstrip('/')}/embeddings/*/*/embeddings.parquet"
        try:
            con.execute(
                "CREATE OR REPLACE VIEW embeddings AS SELECT * FROM "
                f"read_parquet('{_quote_literal(pattern)}', hive_partitioning = true)")
        except Exception:  # no file yet: leave the view out rather than fail a write
            con.execute("DROP VIEW IF EXISTS embeddings")


def _recorded_lake_root(con) -> str | None:
    try:
        rows = con.execute("SELECT root FROM nfhm_lake").fetchall()
    except Exception:  # a warehouse written before any embedding run has no nfhm_lake view
        return None
    return rows[0][0] if rows else None


def _quote_literal(text: str) -> str:
    return text.replace("'", "''")
