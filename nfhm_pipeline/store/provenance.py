"""Which result rows belong to the dataset's current split.

Every result row (``metrics``, ``per_class_metrics``, ``predictions``) records the ``split_id`` of
the split it was computed on (``seed<seed>-<hash of the assignment>``, see
:func:`nfhm_pipeline.evaluation.splits.split_identity`). When a dataset is split again (a new seed,
new images), rows of models that were not re-run keep the old id: comparisons, reports and
``nfhm results`` read only current rows and name the models that need re-running.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from nfhm_pipeline.store import warehouse

RESULT_TABLES = ("metrics", "per_class_metrics", "predictions")


def current_split_id(path: str | Path, dataset: str) -> str | None:
    """The ``split_id`` of the dataset's stored split (None: no split, or one written before ids)."""
    if not Path(path).exists():
        return None
    frame = warehouse.query(path, "SELECT DISTINCT split_id FROM splits WHERE dataset = ?", [dataset]) \
        if _has_table(path, "splits") else pd.DataFrame()
    ids = [v for v in frame.get("split_id", pd.Series(dtype=object)).tolist() if isinstance(v, str)]
    return ids[0] if len(ids) == 1 else None


def current_rows(path: str | Path, table: str, dataset: str, **where: str) -> pd.DataFrame:
    """Rows of a result table for ``dataset`` computed on its current split."""
    if table not in RESULT_TABLES:
        raise ValueError(f"{table!r} is not a result table; expected one of {RESULT_TABLES}")
    rows = warehouse.read_table(path, table, dataset=dataset, **where)
    split_id = current_split_id(path, dataset)
    if split_id is None:
        return rows.iloc[0:0] if len(rows) else rows
    return rows[rows["split_id"] == split_id].reset_index(drop=True)


def stale_models(path: str | Path, dataset: str) -> list[str]:
    """Models with result rows for ``dataset`` computed on another split than the current one:
    they must be re-materialized before they can be compared."""
    rows = warehouse.read_table(path, "metrics", dataset=dataset)
    if rows.empty:
        return []
    split_id = current_split_id(path, dataset)
    stale = rows[rows["split_id"].ne(split_id) | rows["split_id"].isna()] if split_id else rows
    return sorted(stale["model"].astype(str).unique().tolist())


def _has_table(path: str | Path, table: str) -> bool:
    frame = warehouse.query(path, "SELECT count(*) AS n FROM information_schema.tables WHERE table_name = ?", [table])
    return bool(frame["n"].iloc[0])
