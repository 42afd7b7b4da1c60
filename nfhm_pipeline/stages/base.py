"""What every stage takes and returns, without Dagster.

A stage is one module of ``stages/`` with ``run(spec, model, paths, device, ...) -> StageResult``:
it reads its inputs through ``store/``, calls the library, writes its outputs (lake, warehouse,
report files) and returns what a person (or Dagster's UI) should see. A notebook calls it with a
``Paths`` and nothing else::

    from nfhm_pipeline.stages import knn
    result = knn.run(catalog.datasets["leeds_butterfly"], "raw-pixels", Paths.under("data"))
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd


@dataclass(frozen=True)
class Paths:
    """Where a stage reads and writes: the data folder, the embedding lake (a path or a URI) and the
    DuckDB warehouse. Plain values, so a stage runs the same under Dagster, a script or a notebook."""

    data_dir: Path
    lake_root: str
    warehouse: Path

    @classmethod
    def under(cls, data_dir: str | os.PathLike, lake_root: str | None = None) -> "Paths":
        data = Path(data_dir).expanduser().resolve()
        return cls(data_dir=data, lake_root=lake_root or str(data / "lake"), warehouse=data / "warehouse.duckdb")

    def subdir(self, *parts: str) -> Path:
        path = self.data_dir.joinpath(*parts)
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def lake(self):
        from nfhm_pipeline.store.embedding_store import EmbeddingStore

        return EmbeddingStore(self.lake_root)

    def manifest_path(self, dataset: str) -> Path:
        return self.subdir("manifests") / f"{dataset}.parquet"


@dataclass(frozen=True)
class Markdown:
    """Metadata text to render as markdown (a table, an image data URI)."""

    text: str


@dataclass(frozen=True)
class FilePath:
    """Metadata naming a file the stage wrote."""

    path: str


@dataclass(frozen=True)
class CheckOutcome:
    """The outcome of one of the stage's checks (declared in the asset table with its blocking flag)."""

    name: str
    passed: bool
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageResult:
    """What a stage did: metadata for people (plain values, ``Markdown``, ``FilePath``, small
    ``DataFrame``s shown as tables) and the outcomes of its checks."""

    metadata: dict[str, Any] = field(default_factory=dict)
    checks: list[CheckOutcome] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # logged by the caller


def markdown_table(frame: pd.DataFrame, max_rows: int = 10, floatfmt: str = "{:.3f}") -> Markdown:
    """A DataFrame as a markdown table (Dagster renders markdown tables in the UI)."""
    frame = frame.head(max_rows)
    if frame.empty:
        return Markdown("_(empty)_")

    def cell(v):
        if isinstance(v, float):
            return floatfmt.format(v) if pd.notna(v) else ""
        return str(v).replace("|", "\\|")

    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    sep = "| " + " | ".join("---" for _ in frame.columns) + " |"
    rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return Markdown("\n".join([header, sep, *rows]))
