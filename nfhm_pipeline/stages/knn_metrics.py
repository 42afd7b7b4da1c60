"""``<dataset>/knn_metrics``, per model: nearest-neighbour accuracy per label level and group on the
shared split (top-1 / per-class mean, cosine / Euclidean, raw and L2-normalised), top-k, balanced
accuracy, macro-F1; predictions per test image. Runs on the torch device."""
from __future__ import annotations

from nfhm_pipeline.evaluation import names
from nfhm_pipeline.stages.base import (
    Device, Log, Paths, StageResult, headline_metadata, load_evaluation_inputs, provenance_of, quiet, store_results, with_intervals,
)

TASKS = (names.KNN,)
DESCRIPTION = ("Nearest-neighbour accuracy per label level and group: top-1 / mean cosine, top-1 / mean Euclidean "
               "(raw and L2-normalised), top-k, balanced accuracy, macro-F1.")


def run(dataset, model, paths: Paths, device: Device, *, run_id: str | None = None, log: Log = quiet) -> StageResult:
    from nfhm_pipeline.evaluation.tables import knn_tables
    from nfhm_pipeline.reports.maps import use_numba_cache

    use_numba_cache(paths.data_dir / "cache" / "numba")  # the compiled kNN passes, compiled once per machine
    inputs = load_evaluation_inputs(paths, dataset, model.key)
    tables = with_intervals(knn_tables(inputs.frame, inputs.vectors, dataset.labels, device=device.name),
                            dataset, inputs)
    metrics = store_results(paths, dataset.name, model.key, TASKS, tables,
                            provenance_of("knn_metrics", dataset, inputs, device, run_id, seeded=True,
                                          intervals=True), log)
    return StageResult(metadata=headline_metadata(metrics, tables, names.HEADLINE_METRICS[names.KNN],
                                                  inputs.split_id))
