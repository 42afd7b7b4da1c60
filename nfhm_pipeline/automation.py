"""Schedules, sensors and automation for the catalog's datasets.

- ``reembed_<dataset>`` schedules (cron ``NFHM_REEMBED_CRON``, default nightly 02:00) ask for one
  run per model of the dataset's embedding assets; the incremental store makes a run with nothing
  new cost little more than reading the manifest and the stored table.
- ``manifest_source_sensor`` fingerprints every dataset's source cheaply (bytes of its CSV /
  taxonomy / small .npz, name/size/mtime of a bounded sample of the image files it lists or
  contains) and asks for a manifest + split run when one changes. The cursor keeps the last
  fingerprints; with no cursor yet (a fresh daemon after ``make demo``) a dataset is compared
  with the fingerprint its materialized manifest recorded, so nothing is rebuilt for nothing.
  Each dataset has a time budget: one that fails or runs out of time is skipped with a log line
  and tried first on the next tick, never holding up the others.
- Metric assets carry ``AutomationCondition.eager()`` and the cross-model report ``on_cron``; the
  automation sensor declared here runs them (Dagster's implicit one would start stopped).
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import dagster as dg

from nfhm_pipeline.catalog import Catalog, DatasetSpec

EMBEDDING_STAGES = ("image_embeddings", "text_embeddings")
DEFAULT_REEMBED_CRON = "0 2 * * *"

# The manifest asset records its source's fingerprint under this metadata key (see the sensor).
SOURCE_FINGERPRINT_KEY = "source_fingerprint"
# Changing what goes into a fingerprint changes every digest once; the version says so.
_FINGERPRINT_RECIPE = "nfhm-source-fingerprint-v2"


def _vlm4bio_path_column(header: list[str], params: dict) -> str | None:
    return next((c for c in ("fileNameAsDelivered", "fileName") if c in header), None)


# Readers whose source lists image files (the files listed are part of the source): how to find
# the column that lists them. Every reader of the catalog is here or in _SELF_CONTAINED_READERS;
# a test keeps the two complete, so a new reader cannot be forgotten silently.
_LISTING_READERS: dict[str, Callable[[list[str], dict], str | None]] = {
    "label_csv": lambda header, params: params.get("path_column"),
    "vlm4bio_csv": _vlm4bio_path_column,
    "chexpert_csv": lambda header, params: params.get("path_column", "Path"),
}
# Readers whose source lists no file: a folder (walked), an .npz, or generated images.
_SELF_CONTAINED_READERS = ("image_folder", "medmnist_npz", "demo_shapes", "sklearn_digits")
# Catalog fields naming a source file whose bytes are part of the source.
_SOURCE_FILE_FIELDS = ("csv", "npz", "taxonomy")
# Source files up to this size are hashed (streamed); bigger ones by size and mtime only.
_HASH_LIMIT_BYTES = 64 * 2**20
# At most this many image files are stat'ed per dataset. Above it, a fixed sample (chosen by a
# hash of the name, the same on every tick) plus the mtimes of the folders they sit in: an image
# added, removed or renamed changes its folder; one rewritten in place is seen when sampled.
STAT_SAMPLE_LIMIT = 50_000
_CSV_CHUNK_ROWS = 200_000
# Dagster stops a sensor tick after 60 s: the whole tick stays well under it, one dataset under less.
DATASET_BUDGET_S = 20.0
TICK_BUDGET_S = 45.0


class FingerprintTimeout(Exception):
    """A dataset's fingerprint ran past its time budget (a huge or slow source); retried next tick."""


@dataclass(frozen=True)
class SourceFingerprint:
    digest: str
    listed_rows: int  # rows of the listing read (CSV data rows, or files found in a folder)
    files_stated: int  # image files stat'ed: at most STAT_SAMPLE_LIMIT
    sampled: bool  # True when more files were listed than stat'ed


def _file_state(path: str | os.PathLike) -> str:
    try:
        st = os.stat(path)
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the name
        return f"{path}:unreadable:{getattr(exc, 'strerror', None) or type(exc).__name__}"
    return f"{path}:{st.st_size}:{st.st_mtime_ns}"


def _check(deadline: float | None, what: str) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise FingerprintTimeout(f"fingerprinting {what} ran past its time budget")


def _hash_file(h, path: str, deadline: float | None) -> None:
    """Size and mtime of ``path``, and its bytes when it is a regular file under the hash limit."""
    h.update(_file_state(path).encode())
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size > _HASH_LIMIT_BYTES:
            return
        with open(path, "rb") as handle:
            while block := handle.read(2**20):
                h.update(block)
                _check(deadline, path)
    except (OSError, ValueError):
        pass  # the state above already says it is unreadable


def _listed_names(spec: DatasetSpec, deadline: float | None) -> tuple[Path, list[str], int, bool]:
    """(root the names are relative to, a sample of at most STAT_SAMPLE_LIMIT distinct listed names,
    rows read, whether names were left out of the sample). Reads only the path column, in chunks."""
    import csv

    import pandas as pd

    from nfhm_pipeline.catalog import CSV_DELIMITERS

    csv_path = Path(spec.params["csv"]).absolute()
    sep = CSV_DELIMITERS.get(spec.params.get("delimiter") or ",", ",")
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        header = [c.strip() for c in next(csv.reader(handle, delimiter=sep), [])]
    column = _LISTING_READERS[spec.reader](header, spec.params)
    if column is None or column not in header:
        raise KeyError(f"no path column {column!r}")
    position = header.index(column)
    root = Path(os.path.abspath(spec.params.get("image_root") or csv_path.parent))
    # The names whose hash is smallest: a bounded sample that is the same on every tick.
    kept = pd.Series([], dtype=object)
    rows, truncated = 0, False
    for chunk in pd.read_csv(csv_path, usecols=[position], dtype=str, keep_default_na=False, sep=sep,
                             encoding="utf-8-sig", chunksize=_CSV_CHUNK_ROWS):
        _check(deadline, str(csv_path))
        rows += len(chunk)
        names = chunk.iloc[:, 0].str.strip()
        names = pd.concat([kept, names[names != ""]]).drop_duplicates()
        names.index = pd.util.hash_pandas_object(names, index=False).to_numpy()
        if len(names) > STAT_SAMPLE_LIMIT:
            truncated = True
            names = names.sort_index(kind="stable").iloc[:STAT_SAMPLE_LIMIT]
        kept = names
    return root, sorted(kept.tolist()), rows, truncated


def _stat_sample(h, paths: list[str], truncated: bool, deadline: float | None, what: str) -> None:
    for i, path in enumerate(paths):
        if i % 1024 == 0:
            _check(deadline, what)
        h.update(_file_state(path).encode())
    if truncated:
        for folder in sorted({os.path.dirname(p) for p in paths}):
            h.update(_file_state(folder).encode())


def fingerprint_source(spec: DatasetSpec, *, deadline: float | None = None) -> SourceFingerprint:
    """A digest that changes when a dataset's source changes, cheap enough for every sensor tick.

    Covers the catalog entry (reader + parameters), the bytes of its CSV, taxonomy CSV or .npz
    (size and mtime only above 64 MiB), and name, size and mtime of the image files it lists (CSV
    readers: only the path column is read) or contains (image_folder: every name, sizes and mtimes
    of a bounded sample). Generated demo sources have no outside input: their fingerprint is their
    parameters. A missing or unreadable source is part of the digest, never an error, so the run
    requested reports the problem and fixing it fires the sensor again. ``deadline``
    (``time.monotonic()``): raise :class:`FingerprintTimeout` once past it.
    """
    h = hashlib.sha256(json.dumps([_FINGERPRINT_RECIPE, spec.reader, spec.params], sort_keys=True,
                                  default=str).encode())
    for key in _SOURCE_FILE_FIELDS:
        if spec.params.get(key):
            _hash_file(h, str(spec.params[key]), deadline)
    listed_rows, stated, truncated = 0, 0, False
    if spec.reader in _LISTING_READERS:
        import pandas as pd

        try:
            root, names, listed_rows, truncated = _listed_names(spec, deadline)
        except FingerprintTimeout:
            raise
        except (OSError, ValueError, KeyError, UnicodeDecodeError, pd.errors.ParserError,
                pd.errors.EmptyDataError, StopIteration) as exc:
            h.update(f"unlisted:{type(exc).__name__}".encode())
        else:
            paths = [os.path.normpath(n if os.path.isabs(n) else os.path.join(root, n)) for n in names]
            _stat_sample(h, paths, truncated, deadline, spec.name)
            stated = len(paths)
    root = spec.params.get("root")
    if spec.reader == "image_folder" and root and Path(root).is_dir():
        files = []
        for dirpath, dirnames, filenames in os.walk(root):
            _check(deadline, str(root))
            dirnames.sort()
            for name in sorted(filenames):
                files.append(os.path.join(dirpath, name))
        h.update("\n".join(files).encode())  # every name: an added or removed file always counts
        listed_rows = len(files)
        if len(files) > STAT_SAMPLE_LIMIT:
            truncated = True
            files = sorted(sorted(files, key=lambda f: zlib.crc32(f.encode()))[:STAT_SAMPLE_LIMIT])
        _stat_sample(h, files, truncated, deadline, spec.name)
        stated = len(files)
    return SourceFingerprint(h.hexdigest(), listed_rows, stated, truncated)


def source_fingerprint(spec: DatasetSpec) -> str:
    """The digest of :func:`fingerprint_source`, without a time limit (what the manifest records)."""
    return fingerprint_source(spec).digest


def build_reembed_schedule(catalog: Catalog, dataset: str, cron: str) -> dg.ScheduleDefinition:
    """``reembed_<dataset>``: one run per model of ``dataset`` at each tick of ``cron``.

    One schedule per dataset because a schedule targets one job and a job needs one partitions
    definition: datasets may list different models (``models:`` in the catalog).
    """
    targets = [dg.AssetKey([dataset, stage]) for stage in EMBEDDING_STAGES]

    # A plain cron ScheduleDefinition would launch runs without a partition key, and
    # build_schedule_from_partitioned_job refuses static partitions: so one RunRequest per model.
    @dg.schedule(name=f"reembed_{dataset}", cron_schedule=cron, target=dg.AssetSelection.keys(*targets),
                 default_status=dg.DefaultScheduleStatus.STOPPED,
                 description=f"Re-embed {dataset} for every model (incremental: unchanged images are reused).")
    def reembed(context: dg.ScheduleEvaluationContext):
        tick = context.scheduled_execution_time.isoformat() if context.scheduled_execution_time else "manual"
        for model in catalog.models_for(dataset):
            yield dg.RunRequest(
                run_key=f"reembed:{dataset}:{model.key}:{tick}", partition_key=model.key,
                asset_selection=targets,
                tags={"nfhm/dataset": dataset, "nfhm/model": model.key, "nfhm/trigger": "schedule"},
            )

    return reembed


def _read_cursor(cursor: str | None) -> tuple[dict[str, str], list[str]]:
    """(last fingerprint per dataset, datasets skipped last tick); the cursor of older versions
    was the fingerprint dict alone."""
    try:
        state = json.loads(cursor) if cursor else {}
    except ValueError:
        return {}, []
    if not isinstance(state, dict):
        return {}, []
    if "fingerprints" not in state:
        return {k: v for k, v in state.items() if isinstance(v, str)}, []
    return dict(state.get("fingerprints") or {}), list(state.get("skipped") or [])


def _materialized_fingerprint(context: dg.SensorEvaluationContext, dataset: str) -> str | None:
    """The source fingerprint the latest materialization of ``<dataset>/image_manifest`` recorded."""
    try:
        event = context.instance.get_latest_materialization_event(dg.AssetKey([dataset, "image_manifest"]))
    except Exception:  # a context built without an instance: nothing to compare with
        return None
    materialization = event.asset_materialization if event is not None else None
    if materialization is None:
        return None
    value = materialization.metadata.get(SOURCE_FINGERPRINT_KEY)
    value = getattr(value, "value", value)
    return value if isinstance(value, str) else None


def build_manifest_sensor(catalog: Catalog, *, dataset_budget_s: float = DATASET_BUDGET_S,
                          tick_budget_s: float = TICK_BUDGET_S) -> dg.SensorDefinition:
    targets = [dg.AssetKey([ds, s]) for ds in catalog.datasets for s in ("image_manifest", "splits")]

    @dg.sensor(name="manifest_source_sensor", target=dg.AssetSelection.keys(*targets), minimum_interval_seconds=60,
               default_status=dg.DefaultSensorStatus.RUNNING,
               description="Notices new or changed manifest sources (files, CSV content) and rebuilds manifests "
                           "and splits; embeddings and metrics follow through their automation conditions.")
    def manifest_source_sensor(context: dg.SensorEvaluationContext):
        seen, skipped_before = _read_cursor(context.cursor)
        # Datasets skipped last tick go first, so a slow one early in the catalog cannot starve the rest.
        order = sorted(catalog.datasets, key=lambda ds: ds not in skipped_before)
        tick_deadline = time.monotonic() + tick_budget_s
        current = {ds: digest for ds, digest in seen.items() if ds in catalog.datasets}
        skipped, requests = [], []
        for ds in order:
            now = time.monotonic()
            try:
                if now >= tick_deadline:
                    raise FingerprintTimeout("the tick's time budget was spent on other datasets")
                digest = fingerprint_source(catalog.datasets[ds],
                                            deadline=min(now + dataset_budget_s, tick_deadline)).digest
            except Exception as exc:  # one dataset's trouble must not stop change detection for all
                skipped.append(ds)
                context.log.warning(f"manifest_source_sensor: skipped {ds!r} this tick "
                                    f"({type(exc).__name__}: {exc}); it is tried again next tick")
                continue
            current[ds] = digest
            if seen.get(ds) == digest:
                continue
            # First sight of this dataset (a fresh cursor): compare with what is materialized.
            recorded = _materialized_fingerprint(context, ds) if ds not in seen else None
            if recorded == digest:
                continue
            previous = seen.get(ds) or recorded or "none"
            # Run keys are deduplicated forever: the previous digest in the key lets a source that
            # goes back to an earlier state (A → B → A) still get its run.
            requests.append(dg.RunRequest(
                run_key=f"manifest:{ds}:{digest[:16]}:after:{previous[:16]}",
                asset_selection=[dg.AssetKey([ds, "image_manifest"]), dg.AssetKey([ds, "splits"])],
                tags={"nfhm/dataset": ds, "nfhm/trigger": "source_changed"}))
        cursor = json.dumps({"fingerprints": current, "skipped": skipped}, sort_keys=True)
        return dg.SensorResult(run_requests=requests, cursor=cursor)

    return manifest_source_sensor


def automation_defs(catalog: Catalog) -> tuple[list, list, list]:
    """(schedules, sensors, jobs) for ``Definitions``."""
    cron = os.environ.get("NFHM_REEMBED_CRON", DEFAULT_REEMBED_CRON)
    automation = dg.AutomationConditionSensorDefinition(
        "nfhm_automation", target=dg.AssetSelection.all(), default_status=dg.DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=60)
    schedules = [build_reembed_schedule(catalog, ds, cron) for ds in catalog.datasets]
    return schedules, [build_manifest_sensor(catalog), automation], []
