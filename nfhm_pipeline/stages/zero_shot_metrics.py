"""``<dataset>/zero_shot_metrics``, per model: zero-shot top-1 / top-5 (first template vs prompt
ensemble) and image↔text retrieval Precision@K / Recall@K from the stored text embeddings, each with its paired bootstrap
95 % interval (image queries resampled like every other metric, text queries among themselves);
empty results for a model without a text tower."""
from __future__ import annotations

from nfhm_pipeline.errors import StorageError
from nfhm_pipeline.evaluation import names
from nfhm_pipeline.stages.base import (
    Device, Log, Paths, StageResult, headline_metadata, load_evaluation_inputs, provenance_of, quiet, store_results,
    with_intervals,
)

TASKS = (names.ZERO_SHOT, names.RETRIEVAL)
DESCRIPTION = ("Zero-shot top-1/top-5 (first template vs prompt ensemble) and image↔text retrieval Precision@K / "
               "Recall@K, for models with a text tower.")


def read_text(paths: Paths, dataset: str, model: str):
    """(prompts, vectors) stored by text_embeddings; an empty frame for a model without a text tower."""
    from nfhm_pipeline.store.text_store import read_text_embeddings

    text = read_text_embeddings(paths.lake, dataset, model)
    if text is None:
        raise StorageError(f"no text embeddings for {dataset}/{model}: materialize {dataset}/text_embeddings "
                           f"for partition {model!r} first")
    return text


def run(dataset, model, paths: Paths, device: Device | None = None, *, run_id: str | None = None,
        log: Log = quiet) -> StageResult:
    from nfhm_pipeline.evaluation.tables import EvalTables, zero_shot_tables
    from nfhm_pipeline.store import provenance

    prompts, text_vectors = read_text(paths, dataset.name, model.key)
    if prompts.empty:
        split_id = provenance.current_split_id(paths.warehouse, dataset.name)
        store_results(paths, dataset.name, model.key, TASKS, EvalTables(),
                      provenance_of("zero_shot_metrics", dataset, None, device, run_id, split_id=split_id), log)
        return StageResult(metadata={"text_tower": False, "dagster/row_count": 0})
    class_prompts = (prompts["use"] == "zero_shot").to_numpy()
    prompts, text_vectors = prompts[class_prompts].reset_index(drop=True), text_vectors[class_prompts]
    inputs = load_evaluation_inputs(paths, dataset, model.key)
    tables = with_intervals(zero_shot_tables(inputs.frame, inputs.vectors, prompts.drop(columns=["use"]),
                                             text_vectors, dataset.labels), dataset, inputs)
    metrics = store_results(paths, dataset.name, model.key, TASKS, tables,
                            provenance_of("zero_shot_metrics", dataset, inputs, device, run_id, seeded=True,
                                          intervals=True), log)
    headline = names.HEADLINE_METRICS[names.ZERO_SHOT]
    return StageResult(metadata=headline_metadata(metrics, tables, headline, inputs.split_id))
