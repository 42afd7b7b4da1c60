"""What every stage takes and returns, and the reads and writes several stages share.

A stage is ``run(dataset, model, paths, device, *, run_id=None, log=None) -> StageResult``:

* ``dataset`` a catalog :class:`~nfhm_pipeline.catalog.DatasetSpec`, ``model`` a
  :class:`~nfhm_pipeline.catalog.ModelSpec` (None for the stages that are not per model);
* ``paths`` a :class:`Paths` (plain folders and the lake root, no Dagster);
* ``device`` a :class:`Device` (the torch device string and batching settings).

It reads its inputs, computes, writes its outputs and returns a :class:`StageResult`: metadata
as plain values (:class:`Markdown`, :class:`Path`, numbers, strings, lists, dicts) and the
outcomes of the stage's declared checks. ``assets/`` turns that into a Dagster materialization;
a notebook just reads it.
"""
from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd

from nfhm_pipeline.errors import EvaluationError, StorageError


# --- what a stage is given ----------------------------------------------------------------------

@dataclass(frozen=True)
class Paths:
    """Where a stage reads and writes: everything under ``data_dir``; the embedding lake at
    ``lake_root`` (a folder or a URI such as ``s3://bucket/lake``)."""

    data_dir: Path
    lake_root: str

    @classmethod
    def under(cls, data_dir: str | Path, lake_root: str | None = None) -> "Paths":
        data_dir = Path(data_dir).expanduser().resolve()
        return cls(data_dir, lake_root or str(data_dir / "lake"))

    @property
    def warehouse(self) -> Path:
        return self.data_dir / "warehouse.duckdb"

    @property
    def lake(self):
        from nfhm_pipeline.store.embedding_store import EmbeddingStore

        return EmbeddingStore(self.lake_root)

    @property
    def reports(self) -> Path:
        return self.data_dir / "reports"

    def subdir(self, *parts: str) -> Path:
        path = self.data_dir.joinpath(*parts)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create {path}: {exc.strerror}; point NFHM_DATA_DIR at a writable folder") \
                from None
        return path

    def manifest(self, dataset: str) -> Path:
        return self.subdir("manifests") / f"{dataset}.parquet"


@dataclass(frozen=True)
class Device:
    """The resolved torch device (``cuda``, ``mps``, ``cpu``) and how to batch on it."""

    name: str = "cpu"
    precision: str = "fp32"
    batch_size: int = 64
    num_workers: int = 2
    checkpoint_images: int = 1024  # images per checkpoint part: a killed run loses at most this many
    engine: str = "local"  # image embedding in this process, or "ray": Ray Data actors (embedders/ray_engine.py)
    ray_actors: int = 1  # actors of the ray engine (one per GPU on a GPU cluster)


# --- what a stage returns -----------------------------------------------------------------------

class Markdown(str):
    """A metadata value to render as markdown."""


class Location(str):
    """A metadata value naming a file or a URI (``s3://…``), which a Path would mangle."""


@dataclass(frozen=True)
class ColumnSchema:
    """A table's column names and dtypes, for the UI's schema view."""

    columns: tuple[tuple[str, str], ...]

    @classmethod
    def of(cls, frame: pd.DataFrame) -> "ColumnSchema":
        return cls(tuple((str(c), str(t)) for c, t in frame.dtypes.items()))


@dataclass(frozen=True)
class CheckSpec:
    """A check a stage declares (its outcome comes back in every StageResult)."""

    name: str
    description: str
    blocking: bool = False


@dataclass(frozen=True)
class CheckOutcome:
    name: str
    passed: bool
    metadata: dict = field(default_factory=dict)
    warn_only: bool = False  # a failure is a warning, not an error


@dataclass
class StageResult:
    metadata: dict = field(default_factory=dict)
    checks: list[CheckOutcome] = field(default_factory=list)


def markdown_table(frame: pd.DataFrame, max_rows: int = 10, floatfmt: str = "{:.3f}") -> Markdown:
    """A DataFrame as a markdown table (the UI renders markdown metadata)."""
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


def new_run_id(run_id: str | None) -> str:
    """The caller's run id (Dagster's), or a fresh one for a call from a notebook."""
    return run_id or f"local-{uuid.uuid4().hex[:12]}"


Log = Callable[[str], None]


def quiet(_: str) -> None:
    pass


# --- reads several stages share -----------------------------------------------------------------

def read_manifest(paths: Paths, dataset: str) -> pd.DataFrame:
    path = paths.manifest(dataset)
    if not path.exists():
        raise StorageError(f"no manifest for dataset {dataset!r} at {path}: materialize {dataset}/image_manifest first")
    return pd.read_parquet(path)


def read_embeddings(paths: Paths, dataset: str, model: str, order: Sequence[str] | None = None):
    """The stored table of (dataset, model): rows of ``order``'s ids first, in that order (default:
    the manifest's), then the rest. The vectors are streamed from the lake's parts into a
    memory-mapped file under ``<data_dir>/cache/vectors`` (see ``EmbeddingStore.read``): memory
    holds one part at a time while reading, and then what each stage gathers from the mapping."""
    if order is None:
        manifest = paths.manifest(dataset)
        order = pd.read_parquet(manifest, columns=["image_id"])["image_id"].astype(str).tolist() \
            if manifest.exists() else None
    table = paths.lake.read(dataset, model, order=order, into=paths.data_dir / "cache" / "vectors")
    if table is None:
        raise StorageError(f"no embeddings for {dataset}/{model}: materialize {dataset}/image_embeddings "
                           f"for partition {model!r} first")
    return table


def read_split(paths: Paths, dataset: str) -> pd.DataFrame:
    from nfhm_pipeline.store import warehouse

    splits = warehouse.read_table(paths.warehouse, "splits", dataset=dataset)
    if splits.empty:
        raise StorageError(f"no split for {dataset!r}: materialize {dataset}/splits first")
    return splits


def split_id_of(splits: pd.DataFrame) -> str | None:
    ids = splits["split_id"].dropna().unique() if "split_id" in splits else []
    # None (a split written before ids): the rows then read as results of an unknown split,
    # and the model as stale, until the split is materialized again
    return str(ids[0]) if len(ids) == 1 else None


@dataclass
class EvaluationInputs:
    """The split's rows with labels and group (``frame``), their vectors in the same order, the id
    of the split and the fingerprint of the embeddings they were read from."""

    frame: pd.DataFrame
    vectors: "object"
    split_id: str | None
    fingerprint: str | None
    manifest: pd.DataFrame
    # image_id → the unit the bootstrap resamples (a grouped split's leakage unit, or the
    # catalog's resample_by column), None: images
    units: "pd.Series | None" = None
    unit_name: str = "image"

    @property
    def resample_unit(self) -> str:
        return self.unit_name if self.units is not None else "image"


def load_evaluation_inputs(paths: Paths, dataset, model: str) -> EvaluationInputs:
    from nfhm_pipeline.evaluation.tables import evaluation_frame

    manifest = read_manifest(paths, dataset.name)
    splits = read_split(paths, dataset.name)
    # the split's rows first, in the split's order: the evaluation takes them without a copy
    table = read_embeddings(paths, dataset.name, model, order=splits["image_id"].astype(str).tolist())
    frame, vectors = evaluation_frame(manifest, splits, table, dataset.labels)
    units = resample_units(dataset, splits, manifest)
    return EvaluationInputs(frame, vectors, split_id_of(splits), getattr(table, "fingerprint", None), manifest,
                            units, resample_unit_name(dataset, units))


def resample_unit_name(dataset, units: "pd.Series | None") -> str:
    """What the runs table records as ``ci_unit``: "image" or the column one draw takes."""
    if units is None:
        return "image"
    return getattr(dataset, "resample_by", None) or dataset.split.group_by


def resample_units(dataset, splits: pd.DataFrame, manifest: pd.DataFrame | None = None) -> "pd.Series | None":
    """image_id → the unit one bootstrap draw takes, or None to draw images.

    Default: the leakage unit when the split is grouped (the bootstrap resamples what the split
    kept whole). The catalog's ``resample_by`` overrides it: "image", the split's ``group_by``, or
    the dataset's ``group`` column (an image without a value is a unit of its own)."""
    by = getattr(dataset, "resample_by", None)
    group_by = getattr(dataset.split, "group_by", None)
    if by == "image":
        return None
    if by is None or by == group_by:
        if group_by and "split_group" in splits and splits["split_group"].notna().all():
            return splits.set_index("image_id")["split_group"].astype(str)
        return None
    if manifest is None or "group" not in manifest:
        raise EvaluationError(f"Dataset {dataset.name!r} resamples by {by!r} (resample_by), but its manifest has no "
                              f"such column; re-materialize {dataset.name}/image_manifest.")
    values = manifest.set_index("image_id")["group"]
    own = "image:" + values.index.to_series().astype(str)  # no value: the image is a unit of its own
    return ("group:" + values.astype(str)).where(values.notna(), own)


def with_intervals(tables, dataset, inputs: EvaluationInputs):
    """``tables`` with the 95 % intervals of its prediction-based metrics (paired bootstrap over the
    test images, or over leakage units of a grouped split; seeded by the dataset's seed)."""
    from nfhm_pipeline.evaluation.intervals import add_intervals

    add_intervals(tables, inputs.frame, seed=stage_seed(dataset), n_resamples=dataset.resamples,
                  units=inputs.units)
    return tables


# --- the one write of every evaluation stage ----------------------------------------------------

RESULT_TABLES = ("metrics", "per_class_metrics", "predictions", "evaluation_exclusions")


@dataclass(frozen=True)
class Provenance:
    """What a result row was computed from and on: joined to result rows through table ``runs``
    on (dataset, model, task, run_id)."""

    run_id: str
    stage: str
    embedding_fingerprint: str | None
    split_id: str | None
    split_seed: int | None
    stage_seed: int | None
    device: str
    ci_resamples: int | None = None
    ci_unit: str | None = None


def store_results(paths: Paths, dataset: str, model: str, tasks, tables, provenance: Provenance,
                  log: Log | None = None, *, auc_scores: pd.DataFrame | None = None) -> pd.DataFrame:
    """Replace this model's rows of ``tasks`` in every result table and in ``runs``, in ONE warehouse
    transaction; every row carries ``run_id`` and ``split_id``. Returns the metrics frame.
    ``auc_scores`` (the AUC stages: rows with a ``task`` column, an empty frame to clear): that
    table's rows of ``tasks`` are replaced in the same transaction; None leaves it alone."""
    from nfhm_pipeline.evaluation.tables import part_task, with_constants
    from nfhm_pipeline.store import provenance as prov
    from nfhm_pipeline.store import warehouse

    metrics, per_class, _ = tables.frames(predictions=False)
    exclusions = tables.exclusions_frame()
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    extra = {"dataset": dataset, "model": model, "run_id": provenance.run_id, "split_id": provenance.split_id}
    environment = prov.environment(provenance.device)
    writes = []
    for task in tasks:
        where = {"dataset": dataset, "model": model, "task": task}
        for name, frame in zip(RESULT_TABLES, (metrics, per_class, None, exclusions)):
            if name == "predictions":  # the task's Arrow blocks, appended one by one (never concatenated)
                writes.append((name, [with_constants(part, extra) for part in tables.predictions
                                      if part_task(part) == task], where))
                continue
            part = frame[frame["task"] == task] if len(frame) else frame
            part = part.assign(**extra, **({"created_at": now} if name == "metrics" else {}))
            writes.append((name, part, where))
        if auc_scores is not None:
            part = auc_scores[auc_scores["task"] == task] if len(auc_scores) else auc_scores
            writes.append(("auc_scores", part.assign(**extra), where))
        run = {**where, "run_id": provenance.run_id, "stage": provenance.stage,
               "embedding_fingerprint": provenance.embedding_fingerprint, "split_id": provenance.split_id,
               "split_seed": provenance.split_seed, "stage_seed": provenance.stage_seed, **environment,
               "created_at": now, "ci_resamples": provenance.ci_resamples, "ci_unit": provenance.ci_unit}
        writes.append(("runs", pd.DataFrame([run]), where))
    warehouse.replace_many(paths.warehouse, writes, log_wait=log)
    return metrics


def evaluation_metadata(tables, split_id: str | None) -> dict:
    """Metadata every evaluation stage shows: the split used, what was skipped or left out."""
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


def headline_metadata(metrics: pd.DataFrame, tables, headline, split_id: str | None) -> dict:
    """The overall (grp=all) headline metrics as a table and one number each, plus
    :func:`evaluation_metadata`."""
    overall = metrics[(metrics["grp"] == "all") & metrics["metric"].isin(list(headline))] if len(metrics) else metrics
    table = overall.pivot_table(index="level", columns="metric", values="value").reset_index() if len(overall) \
        else overall
    meta = {"dagster/row_count": len(metrics), "results (grp=all)": markdown_table(table)}
    for row in overall.itertuples():
        meta[f"{row.level}/{row.metric}"] = float(row.value)
        low, high = getattr(row, "ci_low", None), getattr(row, "ci_high", None)
        if low is not None and pd.notna(low) and pd.notna(high):
            meta[f"{row.level}/{row.metric} 95% CI"] = f"[{low:.4f}, {high:.4f}] ({row.ci_method})"
    meta.update(evaluation_metadata(tables, split_id))
    return meta


def stage_seed(dataset) -> int:
    """The seed of probes, alignment heads and UMAP: the dataset's ``seed`` (default its split seed)."""
    return int(dataset.seed)


def provenance_of(stage: str, dataset, inputs: "EvaluationInputs | None", device: Device | None, run_id: str | None,
                  *, split_id: str | None = None, fingerprint: str | None = None,
                  seeded: bool = False, intervals: bool = False) -> Provenance:
    return Provenance(
        ci_resamples=int(dataset.resamples) if intervals else None,
        ci_unit=inputs.resample_unit if intervals and inputs is not None else None,
        run_id=new_run_id(run_id), stage=stage,
        embedding_fingerprint=inputs.fingerprint if inputs is not None else fingerprint,
        split_id=inputs.split_id if inputs is not None else split_id,
        split_seed=int(dataset.split.seed), stage_seed=stage_seed(dataset) if seeded else None,
        device=device.name if device is not None else "cpu")
