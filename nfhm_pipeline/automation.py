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

import json
import os
import time
import dagster as dg

from nfhm_pipeline.catalog import Catalog
from nfhm_pipeline.ingest.fingerprint import (  # noqa: F401  (re-exported: the sensor's vocabulary)
    SOURCE_FINGERPRINT_KEY, STAT_SAMPLE_LIMIT, FingerprintTimeout, SourceFingerprint, fingerprint_source,
    source_fingerprint,
)

EMBEDDING_STAGES = ("image_embeddings", "text_embeddings")
DEFAULT_REEMBED_CRON = "0 2 * * *"

# Dagster stops a sensor tick after 60 s: the whole tick stays well under it, one dataset under less.
DATASET_BUDGET_S = 20.0
TICK_BUDGET_S = 45.0


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
