"""Schedules, sensors and automation for the catalog's datasets.

- ``reembed_<dataset>`` schedules (cron ``NFHM_REEMBED_CRON``, default nightly 02:00) ask for one
  run per model of the dataset's embedding assets; the incremental store makes a run with nothing
  new cost little more than reading the manifest and the stored table.
- ``manifest_source_sensor`` fingerprints every dataset's source (CSV bytes, name/size/mtime of
  every listed or contained image, .npz size/mtime) and asks for a manifest + split run when one
  changes; the cursor keeps the last fingerprints, and each run key carries the new digest.
- Metric assets carry ``AutomationCondition.eager()`` and the cross-model report ``on_cron``; the
  automation sensor declared here runs them (Dagster's implicit one would start stopped).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import dagster as dg

from nfhm_pipeline.catalog import Catalog, DatasetSpec

EMBEDDING_STAGES = ("image_embeddings", "text_embeddings")
DEFAULT_REEMBED_CRON = "0 2 * * *"


# Readers whose source lists image files: the files listed are part of the source.
_LISTING_READERS = ("label_csv", "vlm4bio_csv")
# Source files up to this size are hashed; bigger ones (a MedMNIST .npz) by size and mtime only.
_HASH_LIMIT_BYTES = 16 * 2**20


def _file_state(path: str | os.PathLike) -> str:
    try:
        st = os.stat(path)
    except OSError as exc:
        return f"{path}:unreadable:{exc.strerror}"
    return f"{path}:{st.st_size}:{st.st_mtime_ns}"


def source_fingerprint(spec: DatasetSpec) -> str:
    """A digest that changes when a dataset's source changes.

    Covers the catalog entry (reader + parameters), the bytes of its CSV (or size and mtime of a
    big file such as an .npz), and the name, size and mtime of every image it lists (CSV readers)
    or contains (image_folder). Generated demo sources have no outside input: their fingerprint is
    their parameters. Never raises for a missing or unreadable source: that state is part of the
    digest, so the requested run reports the problem and fixing it fires the sensor again.
    """
    h = hashlib.sha256(json.dumps([spec.reader, spec.params], sort_keys=True, default=str).encode())
    for key in ("csv", "npz"):
        path = spec.params.get(key)
        if not path:
            continue
        h.update(_file_state(path).encode())
        try:
            if os.path.getsize(path) <= _HASH_LIMIT_BYTES:
                h.update(Path(path).read_bytes())
        except OSError:
            pass
    if spec.reader in _LISTING_READERS:
        from nfhm_pipeline.errors import NfhmError
        from nfhm_pipeline.ingest.readers import read_source
        from nfhm_pipeline.stages.manifests import reader_params

        try:  # reads the CSV only; images are stat'ed here, never opened
            uris = read_source(spec.reader, **reader_params(spec, Path("."))).get("uri", [])
        except (NfhmError, NotImplementedError, OSError, ValueError, KeyError) as exc:
            uris = [f"unlisted:{type(exc).__name__}"]
        for uri in uris:
            h.update(_file_state(uri).encode())
    root = spec.params.get("root")
    if spec.reader == "image_folder" and root and Path(root).is_dir():
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                h.update(_file_state(os.path.join(dirpath, name)).encode())
    return h.hexdigest()


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


def build_manifest_sensor(catalog: Catalog) -> dg.SensorDefinition:
    targets = [dg.AssetKey([ds, s]) for ds in catalog.datasets for s in ("image_manifest", "splits")]

    @dg.sensor(name="manifest_source_sensor", target=dg.AssetSelection.keys(*targets), minimum_interval_seconds=60,
               default_status=dg.DefaultSensorStatus.RUNNING,
               description="Notices new or changed manifest sources (files, CSV content) and rebuilds manifests "
                           "and splits; embeddings and metrics follow through their automation conditions.")
    def manifest_source_sensor(context: dg.SensorEvaluationContext):
        seen = json.loads(context.cursor) if context.cursor else {}
        current = {ds: source_fingerprint(spec) for ds, spec in catalog.datasets.items()}
        requests = [
            # Run keys are deduplicated forever: the previous digest in the key lets a source that
            # goes back to an earlier state (A → B → A) still get its run.
            dg.RunRequest(run_key=f"manifest:{ds}:{digest[:16]}:after:{seen.get(ds, 'none')[:16]}",
                          asset_selection=[dg.AssetKey([ds, "image_manifest"]), dg.AssetKey([ds, "splits"])],
                          tags={"nfhm/dataset": ds, "nfhm/trigger": "source_changed"})
            for ds, digest in current.items() if seen.get(ds) != digest
        ]
        return dg.SensorResult(run_requests=requests, cursor=json.dumps(current, sort_keys=True))

    return manifest_source_sensor


def automation_defs(catalog: Catalog) -> tuple[list, list, list]:
    """(schedules, sensors, jobs) for ``Definitions``."""
    cron = os.environ.get("NFHM_REEMBED_CRON", DEFAULT_REEMBED_CRON)
    automation = dg.AutomationConditionSensorDefinition(
        "nfhm_automation", target=dg.AssetSelection.all(), default_status=dg.DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=60)
    schedules = [build_reembed_schedule(catalog, ds, cron) for ds in catalog.datasets]
    return schedules, [build_manifest_sensor(catalog), automation], []
