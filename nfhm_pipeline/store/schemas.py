"""Table schemas, declared once, as data: the warehouse tables and the lake's Parquet schemas.

Writers, readers and tests all use these, so a column is renamed in one place. The warehouse's
CREATE TABLE statements are derived from :data:`WAREHOUSE_TABLES` (never parsed back from SQL).
"""
from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from nfhm_pipeline.errors import StorageError

# DuckDB types the tables use
VARCHAR, INTEGER, BIGINT, DOUBLE, TIMESTAMP = "VARCHAR", "INTEGER", "BIGINT", "DOUBLE", "TIMESTAMP"
BOOLEAN = "BOOLEAN"


@dataclass(frozen=True)
class Column:
    """One warehouse column: its name, its DuckDB type, and whether it may be NULL."""

    name: str
    type: str
    nullable: bool = True

    @property
    def ddl(self) -> str:
        """``name TYPE`` (plus ``NOT NULL`` for a required column), as in CREATE TABLE."""
        return f"{self.name} {self.type}" + ("" if self.nullable else " NOT NULL")


def _key(name: str) -> Column:
    """A required text column (the keys rows are selected by)."""
    return Column(name, VARCHAR, nullable=False)


# The columns of each warehouse table, in order. New columns go at the end of a table:
# ``warehouse.ensure_schema`` adds them (nullable) to a warehouse written by an older version.
WAREHOUSE_TABLES: dict[str, tuple[Column, ...]] = {
    "images": (
        _key("dataset"), _key("image_id"), _key("uri"), Column("width", INTEGER), Column("height", INTEGER),
        Column("label", VARCHAR), Column("grp", VARCHAR), Column("official_split", VARCHAR)),
    "image_labels": (_key("dataset"), _key("image_id"), _key("level"), Column("label", VARCHAR)),
    "rejected_images": (
        _key("dataset"), Column("uri", VARCHAR), Column("source_row", BIGINT), _key("reason"),
        Column("detail", VARCHAR)),
    "splits": (
        _key("dataset"), _key("image_id"), _key("split"), Column("fold", INTEGER), Column("label", VARCHAR),
        Column("grp", VARCHAR), Column("split_group", VARCHAR), Column("split_id", VARCHAR)),
    "split_exclusions": (_key("dataset"), _key("image_id"), Column("label", VARCHAR), Column("reason", VARCHAR)),
    "metrics": (
        _key("dataset"), _key("model"), _key("task"), Column("level", VARCHAR), Column("grp", VARCHAR),
        _key("metric"), Column("value", DOUBLE), Column("std", DOUBLE), Column("n", BIGINT),
        Column("run_id", VARCHAR), Column("created_at", TIMESTAMP), Column("split_id", VARCHAR),
        # 95 % interval of value and how it was made (bootstrap-paired, wilson, cv-std, ...); NULL: none
        Column("ci_low", DOUBLE), Column("ci_high", DOUBLE), Column("ci_method", VARCHAR),
        # probe rows: solver iterations (CV rows: the slowest fold) and whether every fit converged; NULL otherwise
        Column("iterations", INTEGER), Column("converged", BOOLEAN),
        # probe rows: train images fitted (CV folds together; the refit) and train images there were;
        # train_n < train_available: fitted on a stratified subsample (catalog probe_max_train)
        Column("train_n", BIGINT), Column("train_available", BIGINT)),
    "per_class_metrics": (
        _key("dataset"), _key("model"), _key("task"), Column("level", VARCHAR), Column("grp", VARCHAR),
        Column("rule", VARCHAR), Column("class", VARCHAR), Column("support", BIGINT),
        Column("precision", DOUBLE), Column("recall", DOUBLE), Column("f1", DOUBLE),
        Column("run_id", VARCHAR), Column("split_id", VARCHAR),
        # Wilson 95 % interval of the class's recall: which classes are too small to judge
        Column("recall_ci_low", DOUBLE), Column("recall_ci_high", DOUBLE)),
    "predictions": (
        _key("dataset"), _key("model"), _key("task"), Column("level", VARCHAR), Column("grp", VARCHAR),
        Column("rule", VARCHAR), _key("image_id"), Column("true_label", VARCHAR),
        Column("predicted_label", VARCHAR), Column("run_id", VARCHAR), Column("split_id", VARCHAR)),
    "embedding_runs": (
        _key("dataset"), _key("model"), Column("fingerprint", VARCHAR), Column("images", BIGINT),
        Column("new", BIGINT), Column("reused", BIGINT), Column("removed", BIGINT), Column("resumed", BIGINT),
        Column("seconds", DOUBLE), Column("images_per_s", DOUBLE), Column("device", VARCHAR),
        Column("precision", VARCHAR), Column("batch_size", INTEGER), Column("run_id", VARCHAR),
        Column("finished_at", TIMESTAMP),
        # where the embedding time went: decoding images (read, decode, resize) vs the model's forward
        # passes, so a user sees which limits them; 0 when nothing was embedded
        Column("decode_s", DOUBLE), Column("forward_s", DOUBLE),
        # the forward loop waiting for decoded batches: near 0 when decoding keeps up with the model
        Column("wait_s", DOUBLE)),
    # One row per dataset: the facts of its current split (warnings: sentences joined by newlines).
    "split_summary": (
        _key("dataset"), Column("split_id", VARCHAR), Column("mode", VARCHAR), Column("seed", INTEGER),
        Column("requested_test_fraction", DOUBLE), Column("realised_test_fraction", DOUBLE),
        Column("n_train", BIGINT), Column("n_test", BIGINT), Column("n_groups_train", BIGINT),
        Column("n_groups_test", BIGINT), Column("largest_group_share", DOUBLE),
        Column("n_near_duplicate_pairs", BIGINT), Column("warnings", VARCHAR)),
    # Cross-split near-duplicate pairs (perceptual-hash distance), and what the split did about them.
    "near_duplicates": (
        _key("dataset"), _key("image_id_a"), _key("image_id_b"), Column("split_a", VARCHAR),
        Column("split_b", VARCHAR), Column("distance", INTEGER), Column("action", VARCHAR)),
    # Images left out of a level's evaluation (reason no_label_at_level) or given no prediction
    # (reason zero_vector: an all-zero embedding, scored wrong on the test side); per task.
    "evaluation_exclusions": (
        _key("dataset"), _key("model"), _key("task"), Column("level", VARCHAR), _key("image_id"),
        Column("split", VARCHAR), _key("reason"), Column("run_id", VARCHAR), Column("split_id", VARCHAR)),
    # Provenance of every result row: metrics / per_class_metrics / predictions / evaluation_exclusions
    # join here on (dataset, model, task, run_id). One row per (dataset, model, task): the run that
    # wrote that task's current rows, what it read and what it ran on.
    "runs": (
        _key("dataset"), _key("model"), _key("task"), Column("run_id", VARCHAR), Column("stage", VARCHAR),
        Column("embedding_fingerprint", VARCHAR), Column("split_id", VARCHAR), Column("split_seed", INTEGER),
        Column("stage_seed", INTEGER), Column("project_version", VARCHAR), Column("torch_version", VARCHAR),
        Column("open_clip_version", VARCHAR), Column("transformers_version", VARCHAR),
        Column("sklearn_version", VARCHAR), Column("dagster_version", VARCHAR), Column("numpy_version", VARCHAR),
        Column("python_version", VARCHAR), Column("git_commit", VARCHAR), Column("device", VARCHAR),
        Column("device_name", VARCHAR), Column("created_at", TIMESTAMP),
        # the intervals' bootstrap: resamples, unit (image, or the leakage-unit column), seed = stage_seed
        Column("ci_resamples", INTEGER), Column("ci_unit", VARCHAR)),
    # Paired comparisons on the shared split: each model against the best of its (task, level, grp,
    # metric); difference = best - other, its bootstrap CI and p-value, Holm-adjusted over the others.
    "model_differences": (
        _key("dataset"), _key("task"), Column("level", VARCHAR), Column("grp", VARCHAR), _key("metric"),
        _key("model_a"), _key("model_b"), Column("difference", DOUBLE), Column("ci_low", DOUBLE),
        Column("ci_high", DOUBLE), Column("p_value", DOUBLE), Column("p_holm", DOUBLE), Column("test", VARCHAR),
        Column("p_mcnemar", DOUBLE), Column("n", BIGINT), Column("split_id", VARCHAR),
        Column("created_at", TIMESTAMP)),
    # Every (test image, label) entry an AUC counted (multilabel_probe, multilabel_zero_shot,
    # alignment_head): target 0/1 and the score it was ranked by (probe P(positive), zero-shot cosine
    # margin, head cosine), so model_comparison can pair models on the same images (DeLong).
    "auc_scores": (
        _key("dataset"), _key("model"), _key("task"), Column("level", VARCHAR), _key("finding"),
        _key("image_id"), Column("target", INTEGER), Column("score", DOUBLE), Column("run_id", VARCHAR),
        Column("split_id", VARCHAR)),
}


def _table(table: str) -> tuple[Column, ...]:
    try:
        return WAREHOUSE_TABLES[table]
    except KeyError:
        raise StorageError(f"unknown warehouse table {table!r}; tables: {sorted(WAREHOUSE_TABLES)}") from None


def table_columns(table: str) -> list[str]:
    """Column names of a warehouse table, in order."""
    return [c.name for c in _table(table)]


def create_table_sql(table: str) -> str:
    """``CREATE TABLE IF NOT EXISTS <table> (...)`` for a warehouse table, from its columns."""
    return f"CREATE TABLE IF NOT EXISTS {table} ({', '.join(c.ddl for c in _table(table))})"


def add_column_sql(table: str, column: Column) -> str:
    """``ALTER TABLE ... ADD COLUMN`` for a column an older warehouse lacks (nullable: old rows get NULL)."""
    return f"ALTER TABLE {table} ADD COLUMN {column.name} {column.type}"


EMBEDDING_FINGERPRINT_KEY = b"nfhm.fingerprint"
EMBEDDING_MODEL_KEY = b"nfhm.model"


def embedding_schema(dim: int, fingerprint: str = "", model: str = "") -> pa.Schema:
    """``image_id`` + ``embedding`` as ``FixedSizeList<float32>[dim]``, fingerprint in the metadata."""
    return pa.schema(
        [pa.field("image_id", pa.string(), nullable=False),
         pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False)],
        metadata={EMBEDDING_FINGERPRINT_KEY: fingerprint.encode(), EMBEDDING_MODEL_KEY: model.encode()},
    )


# -- text embeddings: one row per prompt ------------------------------------------------------------
# ``use`` says what a prompt is for: ``zero_shot`` for the class prompts (zero-shot classification
# and retrieval); label prompts of multi-label evaluation use e.g. ``auc_positive``/``auc_negative``.
TEXT_PROMPT_COLUMNS = ("level", "class", "template", "prompt", "use")
TEXT_USE_ZERO_SHOT = "zero_shot"


def text_embedding_schema(dim: int, fingerprint: str = "") -> pa.Schema:
    """The prompt columns (strings) + ``embedding`` as ``FixedSizeList<float32>[dim]``, the model
    fingerprint in the metadata."""
    return pa.schema([*(pa.field(c, pa.string()) for c in TEXT_PROMPT_COLUMNS),
                      pa.field("embedding", pa.list_(pa.float32(), dim))],
                     metadata={EMBEDDING_FINGERPRINT_KEY: fingerprint.encode()})
