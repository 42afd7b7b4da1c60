"""Schedules, sensors and automation for the catalog's datasets.

- ``reembed_schedule`` (cron ``NFHM_REEMBED_CRON``, default nightly 02:00) asks for one run per
  (dataset, model) of that dataset's embedding assets; the incremental store makes a run with
  nothing new cost little more than reading the manifest.
- ``manifest_source_sensor`` fingerprints every dataset's source (CSV/npz bytes, folder listings)
  and asks for a manifest + split run when one changes; the cursor keeps the last fingerprints.
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


def source_fingerprint(spec: DatasetSpec) -> str:
    """A digest that changes when a dataset's source changes (content of files, names of images).

    Generated demo sources have no outside input: their fingerprint is their parameters.
    """
    h = hashlib.sha256(json.dumps([spec.reader, spec.params], sort_keys=True, default=str).encode())
    for key in ("csv", "npz"):
        path = spec.params.get(key)
        if path and Path(path).is_file():
            h.update(Path(path).read_bytes())
    root = spec.params.get("root") or spec.params.get("image_root")
    if root and Path(root).is_dir():
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                st = os.stat(os.path.join(dirpath, name))
                h.update(f"{os.path.relpath(os.path.join(dirpath, name), root)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def build_reembed_schedule(catalog: Catalog, cron: str) -> dg.ScheduleDefinition:
    targets = [dg.AssetKey([ds, stage]) for ds in catalog.datasets for stage in EMBEDDING_STAGES]

    # A plain cron ScheduleDefinition would launch runs without a partition key, and
    # build_schedule_from_partitioned_job refuses static partitions: so one RunRequest per model.
    @dg.schedule(name="reembed_schedule", cron_schedule=cron, target=dg.AssetSelection.keys(*targets),
                 default_status=dg.DefaultScheduleStatus.STOPPED,
                 description="Re-embed every dataset for every model (incremental: unchanged images are reused).")
    def reembed_schedule(context: dg.ScheduleEvaluationContext):
        tick = context.scheduled_execution_time.isoformat() if context.scheduled_execution_time else "manual"
        for ds, spec in catalog.datasets.items():
            for model in catalog.models_for(ds):
                yield dg.RunRequest(
                    run_key=f"reembed:{ds}:{model.key}:{tick}", partition_key=model.key,
                    asset_selection=[dg.AssetKey([ds, stage]) for stage in EMBEDDING_STAGES],
                    tags={"nfhm/dataset": ds, "nfhm/model": model.key, "nfhm/trigger": "schedule"},
                )

    return reembed_schedule


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
            dg.RunRequest(run_key=f"manifest:{ds}:{digest[:16]}",  # run keys are deduplicated forever
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
    return [build_reembed_schedule(catalog, cron)], [build_manifest_sensor(catalog), automation], []
