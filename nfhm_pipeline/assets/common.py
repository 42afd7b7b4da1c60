"""Small helpers shared by the asset modules: metadata formatting and manifest reading."""
from __future__ import annotations

from pathlib import Path

import dagster as dg
import pandas as pd

from nfhm_pipeline.errors import StorageError
from nfhm_pipeline.resources import NfhmStorage


def manifest_path(storage: NfhmStorage, dataset: str) -> Path:
    return storage.subdir("manifests") / f"{dataset}.parquet"


def read_manifest(storage: NfhmStorage, dataset: str) -> pd.DataFrame:
    path = manifest_path(storage, dataset)
    if not path.exists():
        raise StorageError(f"no manifest for dataset {dataset!r} at {path}: materialize {dataset}/image_manifest first")
    return pd.read_parquet(path)


def markdown_table(frame: pd.DataFrame, max_rows: int = 10, floatfmt: str = "{:.3f}") -> dg.MetadataValue:
    """A DataFrame as a markdown metadata value (Dagster renders markdown tables in the UI)."""
    frame = frame.head(max_rows)
    if frame.empty:
        return dg.MetadataValue.md("_(empty)_")

    def cell(v):
        if isinstance(v, float):
            return floatfmt.format(v) if pd.notna(v) else ""
        return str(v).replace("|", "\\|")

    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    sep = "| " + " | ".join("---" for _ in frame.columns) + " |"
    rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return dg.MetadataValue.md("\n".join([header, sep, *rows]))


def column_schema(frame: pd.DataFrame) -> dg.TableSchema:
    return dg.TableSchema(columns=[dg.TableColumn(name=str(c), type=str(t)) for c, t in frame.dtypes.items()])


def write_parquet_atomic(frame: pd.DataFrame, path: Path) -> Path:
    import os
    import uuid

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        frame.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StorageError(f"cannot write {path}: {exc}") from None
    return path
