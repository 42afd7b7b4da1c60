"""Table schemas, declared once: the warehouse DDL and the embedding Parquet schema.

Writers, readers and tests all use these, so a column is renamed in one place.
"""
from __future__ import annotations

import pyarrow as pa

# Column order of each warehouse table; DDL below must match.
WAREHOUSE_DDL: dict[str, str] = {
    "images": """
        dataset VARCHAR NOT NULL, image_id VARCHAR NOT NULL, uri VARCHAR NOT NULL,
        width INTEGER, height INTEGER, label VARCHAR, grp VARCHAR, official_split VARCHAR""",
    "image_labels": "dataset VARCHAR NOT NULL, image_id VARCHAR NOT NULL, level VARCHAR NOT NULL, label VARCHAR",
    "rejected_images": "dataset VARCHAR NOT NULL, uri VARCHAR, source_row BIGINT, reason VARCHAR NOT NULL, detail VARCHAR",
    "splits": """
        dataset VARCHAR NOT NULL, image_id VARCHAR NOT NULL, split VARCHAR NOT NULL, fold INTEGER,
        label VARCHAR, grp VARCHAR""",
    "split_exclusions": "dataset VARCHAR NOT NULL, image_id VARCHAR NOT NULL, label VARCHAR, reason VARCHAR",
    "metrics": """
        dataset VARCHAR NOT NULL, model VARCHAR NOT NULL, task VARCHAR NOT NULL, level VARCHAR,
        grp VARCHAR, metric VARCHAR NOT NULL, value DOUBLE, std DOUBLE, n BIGINT, run_id VARCHAR,
        created_at TIMESTAMP""",
    "per_class_metrics": """
        dataset VARCHAR NOT NULL, model VARCHAR NOT NULL, task VARCHAR NOT NULL, level VARCHAR,
        grp VARCHAR, rule VARCHAR, class VARCHAR, support BIGINT, precision DOUBLE, recall DOUBLE, f1 DOUBLE,
        run_id VARCHAR""",
    "predictions": """
        dataset VARCHAR NOT NULL, model VARCHAR NOT NULL, task VARCHAR NOT NULL, level VARCHAR,
        grp VARCHAR, rule VARCHAR, image_id VARCHAR NOT NULL, true_label VARCHAR,
        predicted_label VARCHAR, run_id VARCHAR""",
    "embedding_runs": """
        dataset VARCHAR NOT NULL, model VARCHAR NOT NULL, fingerprint VARCHAR, images BIGINT,
        new BIGINT, reused BIGINT, removed BIGINT, resumed BIGINT, seconds DOUBLE,
        images_per_s DOUBLE, device VARCHAR, precision VARCHAR, batch_size INTEGER, run_id VARCHAR,
        finished_at TIMESTAMP""",
}


def table_columns(table: str) -> list[str]:
    """Column names of a warehouse table, in DDL order."""
    cols = []
    depth = 0
    current = ""
    for ch in WAREHOUSE_DDL[table]:
        # MAP(VARCHAR, VARCHAR) holds a comma that does not end a column.
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            cols.append(current.split()[0])
            current = ""
        else:
            current += ch
    cols.append(current.split()[0])
    return cols


EMBEDDING_FINGERPRINT_KEY = b"nfhm.fingerprint"
EMBEDDING_MODEL_KEY = b"nfhm.model"


def embedding_schema(dim: int, fingerprint: str = "", model: str = "") -> pa.Schema:
    """``image_id`` + ``embedding`` as ``FixedSizeList<float32>[dim]``, fingerprint in the metadata."""
    return pa.schema(
        [pa.field("image_id", pa.string(), nullable=False),
         pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False)],
        metadata={EMBEDDING_FINGERPRINT_KEY: fingerprint.encode(), EMBEDDING_MODEL_KEY: model.encode()},
    )
