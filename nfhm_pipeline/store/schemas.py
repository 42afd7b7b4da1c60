"""Table schemas, declared once: the warehouse DDL and the embedding Parquet schema.

Writers, readers and tests all use these, so a column is renamed in one place.
"""
from __future__ import annotations

import pyarrow as pa

# Column order of each warehouse table; DDL below must match. New columns go at the end of a
# table: ``warehouse.ensure_schema`` adds them to a warehouse written by an older version.
WAREHOUSE_DDL: dict[str, str] = {
    "images": """
        dataset VARCHAR NOT NULL, image_id VARCHAR NOT NULL, uri VARCHAR NOT NULL,
        width INTEGER, height INTEGER, label VARCHAR, grp VARCHAR, official_split VARCHAR""",
    "image_labels": "dataset VARCHAR NOT NULL, image_id VARCHAR NOT NULL, level VARCHAR NOT NULL, label VARCHAR",
    "rejected_images": "dataset VARCHAR NOT NULL, uri VARCHAR, source_row BIGINT, reason VARCHAR NOT NULL, detail VARCHAR",
    "splits": """
        dataset VARCHAR NOT NULL, image_id VARCHAR NOT NULL, split VARCHAR NOT NULL, fold INTEGER,
        label VARCHAR, grp VARCHAR, split_group VARCHAR, split_id VARCHAR""",
    "split_exclusions": "dataset VARCHAR NOT NULL, image_id VARCHAR NOT NULL, label VARCHAR, reason VARCHAR",
    "metrics": """
        dataset VARCHAR NOT NULL, model VARCHAR NOT NULL, task VARCHAR NOT NULL, level VARCHAR,
        grp VARCHAR, metric VARCHAR NOT NULL, value DOUBLE, std DOUBLE, n BIGINT, run_id VARCHAR,
        created_at TIMESTAMP, split_id VARCHAR""",
    "per_class_metrics": """
        dataset VARCHAR NOT NULL, model VARCHAR NOT NULL, task VARCHAR NOT NULL, level VARCHAR,
        grp VARCHAR, rule VARCHAR, class VARCHAR, support BIGINT, precision DOUBLE, recall DOUBLE, f1 DOUBLE,
        run_id VARCHAR, split_id VARCHAR""",
    "predictions": """
        dataset VARCHAR NOT NULL, model VARCHAR NOT NULL, task VARCHAR NOT NULL, level VARCHAR,
        grp VARCHAR, rule VARCHAR, image_id VARCHAR NOT NULL, true_label VARCHAR,
        predicted_label VARCHAR, run_id VARCHAR, split_id VARCHAR""",
    "embedding_runs": """
        dataset VARCHAR NOT NULL, model VARCHAR NOT NULL, fingerprint VARCHAR, images BIGINT,
        new BIGINT, reused BIGINT, removed BIGINT, resumed BIGINT, seconds DOUBLE,
        images_per_s DOUBLE, device VARCHAR, precision VARCHAR, batch_size INTEGER, run_id VARCHAR,
        finished_at TIMESTAMP""",
    # One row per dataset: the facts of its current split (warnings: sentences joined by newlines).
    "split_summary": """
        dataset VARCHAR NOT NULL, split_id VARCHAR, mode VARCHAR, seed INTEGER,
        requested_test_fraction DOUBLE, realised_test_fraction DOUBLE, n_train BIGINT, n_test BIGINT,
        n_groups_train BIGINT, n_groups_test BIGINT, largest_group_share DOUBLE,
        n_near_duplicate_pairs BIGINT, warnings VARCHAR""",
    # Cross-split near-duplicate pairs (perceptual-hash distance), and what the split did about them.
    "near_duplicates": """
        dataset VARCHAR NOT NULL, image_id_a VARCHAR NOT NULL, image_id_b VARCHAR NOT NULL,
        split_a VARCHAR, split_b VARCHAR, distance INTEGER, action VARCHAR""",
    # Images left out of a level's evaluation (reason no_label_at_level) or given no prediction
    # (reason zero_vector: an all-zero embedding, scored wrong on the test side); per task.
    "evaluation_exclusions": """
        dataset VARCHAR NOT NULL, model VARCHAR NOT NULL, task VARCHAR NOT NULL, level VARCHAR,
        image_id VARCHAR NOT NULL, split VARCHAR, reason VARCHAR NOT NULL, run_id VARCHAR, split_id VARCHAR""",
}


def column_definitions(table: str) -> list[tuple[str, str]]:
    """``(name, type and constraints)`` of each column of a warehouse table, in DDL order."""
    cols = []
    depth = 0
    current = ""
    for ch in WAREHOUSE_DDL[table] + ",":
        # MAP(VARCHAR, VARCHAR) holds a comma that does not end a column.
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            name, _, ddl = current.strip().partition(" ")
            cols.append((name, ddl.strip()))
            current = ""
        else:
            current += ch
    return cols


def table_columns(table: str) -> list[str]:
    """Column names of a warehouse table, in DDL order."""
    return [name for name, _ in column_definitions(table)]


EMBEDDING_FINGERPRINT_KEY = b"nfhm.fingerprint"
EMBEDDING_MODEL_KEY = b"nfhm.model"


def embedding_schema(dim: int, fingerprint: str = "", model: str = "") -> pa.Schema:
    """``image_id`` + ``embedding`` as ``FixedSizeList<float32>[dim]``, fingerprint in the metadata."""
    return pa.schema(
        [pa.field("image_id", pa.string(), nullable=False),
         pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False)],
        metadata={EMBEDDING_FINGERPRINT_KEY: fingerprint.encode(), EMBEDDING_MODEL_KEY: model.encode()},
    )
