"""Metric assets per dataset, partitioned by model: kNN rules, linear probes, zero-shot/retrieval."""

import datetime as dt

import dagster as dg
import pandas as pd

from nfhm_pipeline.assets.common import markdown_table, read_manifest
from nfhm_pipeline.assets.embeddings import model_partitions
from nfhm_pipeline.catalog import Catalog, DatasetSpec
from nfhm_pipeline.errors import StorageError
from nfhm_pipeline.resources import NfhmStorage, TorchDevice
from nfhm_pipeline.stages.evaluation import EvalTables, evaluation_frame, knn_tables, probe_tables, zero_shot_tables
from nfhm_pipeline.store import provenance, warehouse
from nfhm_pipeline.store.text_store import read_text_embeddings

# Every table an evaluation asset writes, replaced per (dataset, model, task) in one transaction.
RESULT_TABLES = ("metrics", "per_class_metrics", "predictions", "evaluation_exclusions")


def load_inputs(storage: NfhmStorage, spec: DatasetSpec, model: str):
    """(frame, vectors, split_id): the split's rows with labels and vectors, and the id of that split
    (read with the rows, so results always name the split they were computed on)."""
    manifest = read_manifest(storage, spec.name)
    splits = warehouse.read_table(storage.warehouse_path, "splits", dataset=spec.name)
    if splits.empty:
        raise StorageError(f"no split for {spec.name!r}: materialize {spec.name}/splits first")
    table = storage.lake.read(spec.name, model)
    if table is None:
        raise StorageError(f"no embeddings for {spec.name}/{model}: materialize {spec.name}/image_embeddings "
                           f"for partition {model!r} first")
    frame, vectors = evaluation_frame(manifest, splits, table, spec.labels)
    return frame, vectors, _split_id(splits)


def _split_id(splits: pd.DataFrame) -> str | None:
    ids = splits["split_id"].dropna().unique() if "split_id" in splits else []
    # None (a split written before ids): the rows then read as results of an unknown split,
    # and the model as stale, until the split is materialized again
    return str(ids[0]) if len(ids) == 1 else None


def current_split_id(storage: NfhmStorage, dataset: str) -> str | None:
    """The dataset's current split id, for assets that write (empty) results without reading the split."""
    return provenance.current_split_id(storage.warehouse_path, dataset)


def store_tables(storage: NfhmStorage, dataset: str, model: str, tasks: list[str], tables: EvalTables,
                 run_id: str, split_id: str | None) -> pd.DataFrame:
    """Replace this model's rows of ``tasks`` in every result table, in ONE warehouse transaction;
    every row carries ``split_id``. Returns the metrics frame."""
    metrics, per_class, predictions = tables.frames()
    exclusions = tables.exclusions_frame()
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    extra = {"dataset": dataset, "model": model, "run_id": run_id, "split_id": split_id}
    writes = []
    for task in tasks:
        for name, frame in zip(RESULT_TABLES, (metrics, per_class, predictions, exclusions)):
            part = frame[frame["task"] == task] if len(frame) else frame
            part = part.assign(**extra, **({"created_at": now} if name == "metrics" else {}))
            writes.append((name, part, {"dataset": dataset, "model": model, "task": task}))
    warehouse.replace_many(storage.warehouse_path, writes)
    return metrics


def evaluation_metadata(tables: EvalTables, split_id: str | None) -> dict:
    """Metadata every evaluation asset shows: the split used, what was skipped or left out."""
    meta: dict = {"split_id": split_id or "unknown (materialize the split again)"}
    if tables.skipped:
        meta["skipped"] = tables.skipped
    if tables.single_class_groups:
        meta["single_class_groups_skipped"] = len(tables.single_class_groups)
        meta["single_class_groups_examples"] = [f"{level}/{grp}: only {cls!r}"
                                                for level, grp, cls in tables.single_class_groups[:10]]
    summary = tables.exclusion_summary()
    if summary:
        meta["exclusions"] = summary["counts"]
        meta["exclusion_examples"] = summary["examples"]
    return meta


def _result(metrics: pd.DataFrame, tables: EvalTables, headline: list[str], split_id: str | None) -> dg.MaterializeResult:
    overall = metrics[(metrics["grp"] == "all") & metrics["metric"].isin(headline)] if len(metrics) else metrics
    table = overall.pivot_table(index="level", columns="metric", values="value").reset_index() if len(overall) else overall
    meta = {"dagster/row_count": len(metrics), "results (grp=all)": markdown_table(table)}
    for row in overall.itertuples():
        meta[f"{row.level}/{row.metric}"] = float(row.value)
    meta.update(evaluation_metadata(tables, split_id))
    return dg.MaterializeResult(metadata=meta)


def _deps(spec: DatasetSpec, *stages: str) -> list[dg.AssetKey]:
    return [dg.AssetKey([spec.name, s]) for s in stages]


def knn_metrics_asset(catalog: Catalog, spec: DatasetSpec) -> dg.AssetsDefinition:
    @dg.asset(key=[spec.name, "knn_metrics"], group_name=spec.name, kinds={"pytorch", "duckdb"},
              partitions_def=model_partitions(catalog, spec), deps=_deps(spec, "image_embeddings", "splits"),
              pool="duckdb_writer", automation_condition=dg.AutomationCondition.eager(),
              description="Nearest-neighbour accuracy per label level and group: top-1 / mean cosine, "
                          "top-1 / mean Euclidean (raw and L2-normalised), top-k, balanced accuracy, macro-F1.")
    def knn_metrics(context: dg.AssetExecutionContext, storage: NfhmStorage, torch_device: TorchDevice):
        frame, vectors, split_id = load_inputs(storage, spec, context.partition_key)
        tables = knn_tables(frame, vectors, spec.labels, device=torch_device.resolve())
        metrics = store_tables(storage, spec.name, context.partition_key, ["knn"], tables, context.run_id, split_id)
        return _result(metrics, tables, ["top1_cosine", "mean_cosine", "top1_euclidean", "mean_euclidean"], split_id)

    return knn_metrics


def probe_metrics_asset(catalog: Catalog, spec: DatasetSpec) -> dg.AssetsDefinition:
    @dg.asset(key=[spec.name, "linear_probe_metrics"], group_name=spec.name, kinds={"scikitlearn", "duckdb"},
              partitions_def=model_partitions(catalog, spec), deps=_deps(spec, "image_embeddings", "splits"),
              pool="duckdb_writer", automation_condition=dg.AutomationCondition.eager(),
              description="Standardised LinearSVC (C = 100 / N) and logistic-regression probes: CV accuracy and "
                          "macro-F1 (mean ± std over the split's folds) and held-out test scores.")
    def linear_probe_metrics(context: dg.AssetExecutionContext, storage: NfhmStorage):
        frame, vectors, split_id = load_inputs(storage, spec, context.partition_key)
        tables = probe_tables(frame, vectors, spec.labels, seed=spec.split.seed)
        metrics = store_tables(storage, spec.name, context.partition_key, ["linear_probe", "logistic_probe"],
                               tables, context.run_id, split_id)
        return _result(metrics[metrics["task"] == "linear_probe"] if len(metrics) else metrics, tables,
                       ["cv_accuracy", "cv_macro_f1", "test_accuracy", "test_macro_f1"], split_id)

    return linear_probe_metrics


def zero_shot_metrics_asset(catalog: Catalog, spec: DatasetSpec) -> dg.AssetsDefinition:
    @dg.asset(key=[spec.name, "zero_shot_metrics"], group_name=spec.name, kinds={"pytorch", "duckdb"},
              partitions_def=model_partitions(catalog, spec),
              deps=_deps(spec, "image_embeddings", "text_embeddings", "splits"),
              pool="duckdb_writer", automation_condition=dg.AutomationCondition.eager(),
              description="Zero-shot top-1/top-5 (first template vs prompt ensemble) and image↔text retrieval "
                          "Precision@K / Recall@K, for models with a text tower.")
    def zero_shot_metrics(context: dg.AssetExecutionContext, storage: NfhmStorage):
        model = context.partition_key
        text = read_text_embeddings(storage.lake, spec.name, model)
        if text is None:
            raise StorageError(f"no text embeddings for {spec.name}/{model}: materialize text_embeddings first")
        prompts, text_vectors = text
        if prompts.empty:
            store_tables(storage, spec.name, model, ["zero_shot", "retrieval"], EvalTables(), context.run_id,
                         current_split_id(storage, spec.name))
            return dg.MaterializeResult(metadata={"text_tower": False, "dagster/row_count": 0})
        frame, vectors, split_id = load_inputs(storage, spec, model)
        tables = zero_shot_tables(frame, vectors, prompts, text_vectors, spec.labels)
        metrics = store_tables(storage, spec.name, model, ["zero_shot", "retrieval"], tables, context.run_id, split_id)
        return _result(metrics, tables, ["top1_single_template", "top1_ensemble", "top5_ensemble"], split_id)

    return zero_shot_metrics
