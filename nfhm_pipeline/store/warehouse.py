"""The DuckDB warehouse: one file, tables declared in :mod:`schemas`.

DuckDB locks the file per process (readers too), so a connection is held only for the duration
of one write or one query. Opening waits while another process holds the lock: a writer as long
as the run allows (no deadline unless ``NFHM_WAREHOUSE_LOCK_TIMEOUT_S`` sets one), a reader 60 s,
and both say every 30 s what they wait for. Identifiers (dataset and model names) are only ever
passed as bound parameters, never spliced into SQL.

Test hook (fault tests only): ``NFHM_TEST_PAUSE_AFTER_TABLE=<seconds>`` makes :func:`replace_many`
print ``nfhm-test-pause: table <name>`` to stderr and sleep after each table's rows are written
inside the transaction (``view embeddings`` after the view), and ``nfhm-test-pause: commit``
after the commit; ``<seconds>@<n>`` sleeps only at the process's n-th such point. The tests
SIGKILL the writer there. Unset, it costs nothing.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import pandas as pd

from nfhm_pipeline.errors import SettingsError, StorageError
from nfhm_pipeline.store.remote import is_remote, lake_dataset, redact
from nfhm_pipeline.store.schemas import WAREHOUSE_TABLES, add_column_sql, create_table_sql, table_columns

log = logging.getLogger(__name__)

_LOCK_MARKERS = ("Could not set lock", "Conflicting lock", "database is locked")
LOCK_TIMEOUT_ENV = "NFHM_WAREHOUSE_LOCK_TIMEOUT_S"
READER_LOCK_TIMEOUT_S = 60.0
LOCK_LOG_EVERY_S = 30.0
TEST_PAUSE_ENV = "NFHM_TEST_PAUSE_AFTER_TABLE"
_DEFAULT = object()


def lock_timeout_s(read_only: bool) -> float | None:
    """How long a connection waits for the lock: ``NFHM_WAREHOUSE_LOCK_TIMEOUT_S`` when set
    (``none`` = no limit), else no limit for a writer (a run must not fail because someone reads)
    and 60 s for a reader (a person at ``nfhm sql`` wants an answer, not a hang)."""
    raw = os.environ.get(LOCK_TIMEOUT_ENV, "").strip()
    if not raw:
        return READER_LOCK_TIMEOUT_S if read_only else None
    if raw.lower() in ("none", "inf", "infinite", "unlimited"):
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise SettingsError(f"{LOCK_TIMEOUT_ENV}={raw!r} is not a number of seconds; set it to e.g. 600, "
                            "or to 'none' to wait without a limit")
    return value


@contextlib.contextmanager
def connect(path: str | Path, *, read_only: bool = False, timeout_s=_DEFAULT,
            log_wait: Callable[[str], None] | None = None,
            log_every_s: float = LOCK_LOG_EVERY_S) -> Iterator["duckdb.DuckDBPyConnection"]:
    """Open the warehouse, waiting while another process holds its lock.

    ``timeout_s``: seconds to wait, ``None`` for no limit; default :func:`lock_timeout_s`.
    Every ``log_every_s`` of waiting, a line saying what it waits for goes to this module's
    logger and to ``log_wait`` (e.g. a Dagster ``context.log.info``).
    """
    import duckdb

    path = Path(path)
    if timeout_s is _DEFAULT:
        timeout_s = lock_timeout_s(read_only)
    if read_only and not path.exists():
        raise StorageError(f"warehouse {path} does not exist yet: materialize the assets first (make demo)")
    if not read_only:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create the data folder {path.parent}: {exc.strerror}; "
                               "set NFHM_DATA_DIR to a writable folder") from None
    started = time.monotonic()
    next_log = started + log_every_s
    delay = 0.05
    while True:
        try:
            con = duckdb.connect(str(path), read_only=read_only)
            break
        except duckdb.IOException as exc:
            msg = str(exc)
            if not any(m in msg for m in _LOCK_MARKERS):
                raise StorageError(f"cannot open warehouse {path}: {msg}") from None
            now = time.monotonic()
            if timeout_s is not None and now - started >= timeout_s:
                raise StorageError(f"warehouse {path} is locked by another process for more than "
                                   f"{timeout_s:.0f} s (a running materialization, `nfhm sql`, a notebook?); "
                                   f"try again when it ends, or raise {LOCK_TIMEOUT_ENV}") from None
            if now >= next_log:
                line = (f"waiting {now - started:.0f} s for the warehouse lock on {path} held by another "
                        "process (nfhm sql? a notebook? another run?); it goes on when that process closes it")
                log.warning(line)
                if log_wait is not None:
                    log_wait(line)
                next_log = now + log_every_s
            time.sleep(delay)
            delay = min(delay * 2, 1.0)
    try:
        yield con
    finally:
        con.close()


def ensure_schema(con) -> None:
    """Create missing tables, and add columns declared since an older version wrote the file
    (a new column is NULL in old rows, which then read as results of an unknown split)."""
    for table in WAREHOUSE_TABLES:
        con.execute(create_table_sql(table))
    present: dict[str, set[str]] = {}
    for table, column in con.execute(
            "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = 'main'").fetchall():
        present.setdefault(table, set()).add(column)
    for table, columns in WAREHOUSE_TABLES.items():
        for column in columns:
            if column.name not in present.get(table, set()):
                con.execute(add_column_sql(table, column))


def _checked_columns(table: str, where: dict) -> list[str]:
    """The columns of ``table``, after checking that it and the ``where`` keys are declared ones:
    table and column names are spliced into SQL, so only names from schemas.py may get there."""
    columns = table_columns(table)  # a StorageError for an unknown table
    unknown = [col for col in where if col not in columns]
    if unknown:
        raise StorageError(f"table {table} has no column(s) {unknown} to select rows by")
    return columns


def _with_columns(table: str, part, columns: list[str]):
    """``part`` (pandas frame or pyarrow Table) with exactly ``columns`` in order, missing ones NULL;
    an extra column is an error."""
    names = list(part.columns) if isinstance(part, pd.DataFrame) else list(part.column_names)
    extra = set(names) - set(columns)
    if extra:
        raise StorageError(f"table {table} has no column(s) {sorted(extra)}")
    if isinstance(part, pd.DataFrame):
        return part.reindex(columns=columns)
    import pyarrow as pa

    return pa.table({col: part.column(col) if col in names else pa.nulls(part.num_rows) for col in columns})


def replace_rows(path: str | Path, table: str, frame: pd.DataFrame, **where: str) -> int:
    """Atomically replace the rows of ``table`` matching ``where`` (column = value) by ``frame``.

    Missing columns of ``frame`` are filled with NULL; extra columns are an error.
    Returns the number of rows inserted.
    """
    return replace_many(path, [(table, frame, where)])


def replace_many(path: str | Path, writes: Sequence[tuple[str, object, dict]], *,
                 lake_root: str | None = None, log_wait: Callable[[str], None] | None = None) -> int:
    """Several :func:`replace_rows` in ONE transaction: every table an asset writes changes
    together or not at all, so a kill between two tables never leaves them disagreeing.

    ``writes``: ``(table, rows, where)`` triples; returns the number of rows inserted. ``rows``: a
    pandas frame, a pyarrow Table, or a list of either: the parts of a list are appended one after
    another (DuckDB scans each Arrow table in place), so a table of many million rows, such as
    ``predictions`` at a million images, is never concatenated into one frame to be written.
    ``lake_root``: also refresh the ``embeddings`` view over that lake in the same transaction
    (the embedding asset's run row and the view that shows its table appear together).
    ``log_wait``: where to say, while the lock is held by someone else, what the write waits for.
    """
    prepared = []
    for table, rows, where in writes:
        columns = _checked_columns(table, where)
        parts = [_with_columns(table, part, columns) for part in (rows if isinstance(rows, list) else [rows])]
        prepared.append((table, parts, where, columns))
    import duckdb

    pause = _test_pause_s()  # the test hook (module docstring); None in real runs
    inserted = 0
    table = None
    with connect(path, log_wait=log_wait) as con:
        ensure_schema(con)
        con.execute("BEGIN TRANSACTION")
        try:
            for table, parts, where, columns in prepared:
                if where:
                    cond = " AND ".join(f"{col} = ?" for col in where)
                    con.execute(f"DELETE FROM {table} WHERE {cond}", list(where.values()))
                names = ", ".join(columns)
                for part in parts:
                    if len(part):
                        con.register("incoming", part)
                        con.execute(f"INSERT INTO {table} ({names}) SELECT {names} FROM incoming")
                        con.unregister("incoming")
                        inserted += len(part)
                if pause is not None:
                    _test_pause(f"table {table}", pause)
            if lake_root is not None:
                table = "embeddings (view)"
                _create_embedding_view(con, lake_root)
                if pause is not None:
                    _test_pause("view embeddings", pause)
            con.execute("COMMIT")
        except Exception as exc:
            with contextlib.suppress(Exception):  # after a failed write the transaction may be gone already
                con.execute("ROLLBACK")
            if isinstance(exc, duckdb.Error):
                raise StorageError(f"cannot write table {table} of warehouse {path}: {exc}; check that the "
                                   "data folder is writable and has free space") from None
            raise
    if pause is not None:
        _test_pause("commit", pause)
    return inserted


_test_points_seen = 0


def _test_pause_s() -> tuple[float, int | None] | None:
    raw = os.environ.get(TEST_PAUSE_ENV)
    if not raw:
        return None
    seconds, _, nth = raw.partition("@")
    return float(seconds), int(nth) if nth else None


def _test_pause(point: str, pause: tuple[float, int | None]) -> None:
    """The fault tests' window: say where the writer is, then hold still so it can be killed there
    (at every point, or with ``<seconds>@<n>`` only at this process's n-th point)."""
    global _test_points_seen
    _test_points_seen += 1
    sys.stderr.write(f"nfhm-test-pause: {point}\n")
    sys.stderr.flush()
    seconds, nth = pause
    if nth is None or nth == _test_points_seen:
        time.sleep(seconds)


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
        _create_embedding_view(con, lake_root)


def _create_embedding_view(con, lake_root: str) -> None:
    con.execute(f"CREATE OR REPLACE VIEW nfhm_lake AS SELECT '{_quote_literal(redact(lake_root))}' AS root")
    kinds = [] if is_remote(lake_root) else _embedding_table_kinds(lake_root)
    if not kinds:
        # Remote: see above. Local with no table yet: DuckDB refuses a view over no file.
        con.execute("DROP VIEW IF EXISTS embeddings")
        return
    # DuckDB globs every path it reads, even a single file name: a data folder named 'exp [v2]'
    # would read a sibling 'exp 2'. The root is escaped; only the partition levels and the part
    # names are globs. A part glob never reaches a run's _staging/ folder (one level deeper).
    root = glob_escape(str(lake_root).rstrip('/'))
    patterns = [f"'{_quote_literal(f'{root}/embeddings/*/*/{name}')}'" for name in kinds]
    con.execute(
        "CREATE OR REPLACE VIEW embeddings AS SELECT image_id, embedding, dataset, model FROM "
        f"read_parquet([{', '.join(patterns)}], hive_partitioning = true)")


def _embedding_table_kinds(lake_root: str) -> list[str]:
    """The file-name globs the local lake holds tables under: parts (``part-*.parquet``) and, until
    they are migrated, single-file tables of the earlier layout (``embeddings.parquet``)."""
    base = Path(lake_root) / "embeddings"
    parts = legacy = False
    try:
        for ds in base.iterdir():
            for d in (ds.iterdir() if ds.is_dir() else ()):
                if d.is_dir():
                    legacy = legacy or (d / "embeddings.parquet").is_file()
                    parts = parts or any(d.glob("part-*.parquet"))
    except OSError:
        pass
    return [name for name, present in (("part-*.parquet", parts), ("embeddings.parquet", legacy)) if present]


def glob_escape(text: str) -> str:
    """``text`` as a DuckDB glob that matches only itself: ``[``, ``*`` and ``?`` become one-character
    classes (DuckDB's globs have no backslash escape)."""
    return "".join(f"[{c}]" if c in "[*?" else c for c in text)


def _recorded_lake_root(con) -> str | None:
    try:
        rows = con.execute("SELECT root FROM nfhm_lake").fetchall()
    except Exception:  # a warehouse written before any embedding run has no nfhm_lake view
        return None
    return rows[0][0] if rows else None


def _quote_literal(text: str) -> str:
    return text.replace("'", "''")
