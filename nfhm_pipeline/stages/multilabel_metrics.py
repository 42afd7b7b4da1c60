"""``<dataset>/multilabel_metrics``, per model, on AUC-scored datasets (`evaluates_auc`): ROC AUC per
label on the test split from a one-vs-rest logistic probe per finding/class, and zero-shot from
the stored positive/negative label prompts for models with a text tower; macro and micro AUC.
The uncertain-label policy (or ``one_vs_rest``) is in each row's ``level``."""
from __future__ import annotations

import pandas as pd

from nfhm_pipeline.evaluation import names
from nfhm_pipeline.stages.base import (
    Device, Log, Paths, StageResult, evaluation_metadata, load_evaluation_inputs, markdown_table, provenance_of,
    quiet, stage_seed, store_results,
)

TASKS = (names.MULTILABEL_PROBE, names.MULTILABEL_ZERO_SHOT)
DESCRIPTION = ("ROC AUC per label on the test split: one-vs-rest logistic probe per finding/class, and zero-shot "
               "from positive/negative prompt pairs for models with a text tower; macro and micro AUC. The "
               "uncertain-label policy (or one_vs_rest) is in each row's level.")


def auc_inputs(paths: Paths, dataset, model: str):
    """(evaluation inputs with the findings attached, AUC targets, stored label texts or None)."""
    from nfhm_pipeline.evaluation.multilabel_tables import attach_findings, auc_targets, label_texts_from_table
    from nfhm_pipeline.stages.zero_shot_metrics import read_text

    inputs = load_evaluation_inputs(paths, dataset, model)
    inputs.frame = attach_findings(inputs.frame, inputs.manifest, dataset)
    targets = auc_targets(dataset, inputs.frame)
    prompts, vectors = read_text(paths, dataset.name, model)
    return inputs, targets, label_texts_from_table(dataset, targets, prompts, vectors)


def label_table(per_label: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """label, n_pos, n_neg and one AUC column per task, for the UI."""
    first = next(iter(per_label.values()))
    out = first[["label", "n_pos", "n_neg"]].copy()
    for task, table in per_label.items():
        out[f"auc ({task})"] = table["auc"].to_numpy()
    return out


def run(dataset, model, paths: Paths, device: Device | None = None, *, run_id: str | None = None,
        log: Log = quiet) -> StageResult:
    from nfhm_pipeline.evaluation.multilabel_tables import multilabel_tables

    inputs, targets, text = auc_inputs(paths, dataset, model.key)
    result = multilabel_tables(inputs.frame, inputs.vectors, targets, seed=stage_seed(dataset), text=text)
    metrics = store_results(paths, dataset.name, model.key, TASKS, result.tables,
                            provenance_of("multilabel_metrics", dataset, inputs, Device("cpu"), run_id,
                                          seeded=True), log, auc_scores=result.scores_frame())
    meta = {"dagster/row_count": len(metrics), "level": targets.level, "kind": targets.kind,
            "text_tower": text is not None, "per_label AUC": markdown_table(label_table(result.per_label), 30)}
    for task, summary in result.summary.items():
        meta[f"{task}/macro_auc"] = float(summary["macro_auc"])
        meta[f"{task}/micro_auc"] = float(summary["micro_auc"])
    if text is not None:
        meta["prompts"] = markdown_table(pd.DataFrame({"label": targets.names, "positive": text.positive,
                                                       "negative": text.negative}), 30)
    meta.update(evaluation_metadata(result.tables, inputs.split_id))
    return StageResult(metadata=meta)
