"""``<dataset>/linear_probe_metrics``, per model: standardised LinearSVC (C = 100 / N) and
logistic-regression probes on the shared split: CV accuracy and macro-F1 (mean ± std over the
split's folds) and held-out test scores, each metrics row with its fits' ``iterations`` and
``converged``. Seeded by the dataset's ``seed``."""
from __future__ import annotations

from nfhm_pipeline.evaluation import names
from nfhm_pipeline.stages.base import (
    Device, Log, Paths, StageResult, headline_metadata, load_evaluation_inputs, provenance_of, quiet, stage_seed,
    store_results, with_intervals,
)

TASKS = (names.LINEAR_PROBE, names.LOGISTIC_PROBE)
DESCRIPTION = ("Standardised LinearSVC (C = 100 / N) and logistic-regression probes: CV accuracy and macro-F1 "
               "(mean ± std over the split's folds) and held-out test scores.")


def run(dataset, model, paths: Paths, device: Device | None = None, *, run_id: str | None = None,
        log: Log = quiet) -> StageResult:
    from nfhm_pipeline.evaluation.tables import probe_tables

    inputs = load_evaluation_inputs(paths, dataset, model.key)
    # every fold and refit of every level in one pool of CPU workers; a progress line per finished
    # fit once the stage has run a few seconds (a 30k-image collection takes minutes)
    tables = with_intervals(probe_tables(inputs.frame, inputs.vectors, dataset.labels, seed=stage_seed(dataset),
                                         log=log), dataset, inputs)
    metrics = store_results(paths, dataset.name, model.key, TASKS, tables,
                            provenance_of("linear_probe_metrics", dataset, inputs, Device("cpu"), run_id,
                                          seeded=True, intervals=True), log)
    shown = metrics[metrics["task"] == names.LINEAR_PROBE] if len(metrics) else metrics
    return StageResult(metadata=headline_metadata(shown, tables, names.HEADLINE_METRICS[names.LINEAR_PROBE],
                                                  inputs.split_id))
