"""``<dataset>/alignment_head``, per model, on AUC-scored datasets: a linear projection of frozen
image embeddings onto the stored label-prompt embeddings, trained on the train split with
MedCLIP's semantic-matching loss (seeded by the dataset's ``seed``), saved as safetensors; test-split
AUC per label and its difference to zero-shot (better / worse: beyond 0.5 points with DeLong's paired
p < 0.05), the test entries' scores in ``auc_scores``. Skipped (rows cleared) without a text tower."""
from __future__ import annotations

from nfhm_pipeline.evaluation import names
from nfhm_pipeline.stages.base import (
    Device, Log, Paths, StageResult, evaluation_metadata, markdown_table, provenance_of, quiet, stage_seed,
    store_results,
)

TASKS = (names.ALIGNMENT_HEAD,)
DESCRIPTION = ("A linear projection of frozen image embeddings onto the label-prompt embeddings, trained on the "
               "train split with MedCLIP's semantic-matching loss (seeded), saved as safetensors; test-split AUC "
               "per label and its difference to zero-shot. Skipped without a text tower.")


def run(dataset, model, paths: Paths, device: Device, *, run_id: str | None = None, log: Log = quiet) -> StageResult:
    from nfhm_pipeline.evaluation.multilabel_tables import AucResult, alignment_head_path, alignment_tables
    from nfhm_pipeline.evaluation.tables import EvalTables
    from nfhm_pipeline.stages.multilabel_metrics import auc_inputs
    from nfhm_pipeline.stages.zero_shot_metrics import read_text
    from nfhm_pipeline.store import provenance

    prompts, _ = read_text(paths, dataset.name, model.key)
    if prompts.empty:
        # Clear rows a former text-tower model under this key may have left.
        split_id = provenance.current_split_id(paths.warehouse, dataset.name)
        store_results(paths, dataset.name, model.key, TASKS, EvalTables(),
                      provenance_of("alignment_head", dataset, None, device, run_id, split_id=split_id), log,
                      auc_scores=AucResult().scores_frame())
        return StageResult(metadata={"skipped": f"{model.key} has no text tower", "text_tower": False,
                                     "dagster/row_count": 0})
    inputs, targets, text = auc_inputs(paths, dataset, model.key)
    seed = stage_seed(dataset)
    result = alignment_tables(inputs.frame, inputs.vectors, targets, text, seed=seed, device=device.name)
    path = result.head.save(alignment_head_path(paths.subdir("models"), dataset.name, model.key))
    metrics = store_results(paths, dataset.name, model.key, TASKS, result.auc.tables,
                            provenance_of("alignment_head", dataset, inputs, device, run_id, seeded=True), log,
                            auc_scores=result.auc.scores_frame())
    comparison = result.comparison
    summary = result.auc.summary[names.ALIGNMENT_HEAD]
    return StageResult(metadata={
        "dagster/row_count": len(metrics), "path": path, "level": targets.level,
        "seed": seed, "epochs": len(result.head.loss_history),
        "loss_first_epoch": float(result.head.loss_history[0]), "loss_last_epoch": float(result.head.loss_history[-1]),
        "macro_auc": float(summary["macro_auc"]), "micro_auc": float(summary["micro_auc"]),
        "helps (vs zero-shot)": markdown_table(comparison, 30, floatfmt="{:.4f}"),
        "labels_better": int((comparison["mark"] == "better").sum()),
        "labels_worse": int((comparison["mark"] == "worse").sum()),
        "label_texts": text.positive,
        **evaluation_metadata(result.auc.tables, inputs.split_id),
    })
