"""``<dataset>/multilabel_metrics`` and ``<dataset>/alignment_head``, partitioned by model.

Only for datasets where `evaluates_auc` holds (multi-label CheXpert-style sets, and single-label
medical sets evaluated one-vs-rest). The label decision (uncertain-label policy, or one-vs-rest)
is in the ``level`` column of every warehouse row; see ``nfhm_pipeline.stages.multilabel``.
"""

import dagster as dg
import pandas as pd

from nfhm_pipeline.assets.common import markdown_table, read_manifest
from nfhm_pipeline.assets.embeddings import load_model, model_partitions
from nfhm_pipeline.assets.evaluation import current_split_id, evaluation_metadata, load_inputs, store_tables
from nfhm_pipeline.catalog import Catalog, DatasetSpec
from nfhm_pipeline.resources import NfhmStorage, TorchDevice
from nfhm_pipeline.stages.evaluation import EvalTables
from nfhm_pipeline.stages.multilabel import (
    ALIGNMENT_TASK, MULTILABEL_TASKS, alignment_head_path, alignment_tables,
    attach_findings, auc_targets, embed_label_texts, multilabel_tables,
)


def _inputs(storage: NfhmStorage, spec: DatasetSpec, model: str):
    frame, vectors, split_id = load_inputs(storage, spec, model)
    frame = attach_findings(frame, read_manifest(storage, spec.name), spec)
    return frame, vectors, auc_targets(spec, frame), split_id


def _label_table(per_label: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """label, n_pos, n_neg and one AUC column per task, for the UI."""
    first = next(iter(per_label.values()))
    out = first[["label", "n_pos", "n_neg"]].copy()
    for task, table in per_label.items():
        out[f"auc ({task})"] = table["auc"].to_numpy()
    return out


def multilabel_metrics_asset(catalog: Catalog, spec: DatasetSpec) -> dg.AssetsDefinition:
    @dg.asset(key=[spec.name, "multilabel_metrics"], group_name=spec.name, kinds={"scikitlearn", "duckdb"},
              partitions_def=model_partitions(catalog, spec),
              deps=[dg.AssetKey([spec.name, s]) for s in ("image_embeddings", "splits")],
              pool="duckdb_writer", automation_condition=dg.AutomationCondition.eager(),
              description="ROC AUC per label on the test split: one-vs-rest logistic probe per finding/class, and "
                          "zero-shot from positive/negative prompt pairs for models with a text tower; macro and "
                          "micro AUC. The uncertain-label policy (or one_vs_rest) is in each row's level.")
    def multilabel_metrics(context: dg.AssetExecutionContext, storage: NfhmStorage, torch_device: TorchDevice):
        model = context.partition_key
        frame, vectors, targets, split_id = _inputs(storage, spec, model)
        text = embed_label_texts(load_model(catalog, model, storage, torch_device), spec, targets)
        result = multilabel_tables(frame, vectors, targets, seed=spec.split.seed, text=text)
        metrics = store_tables(storage, spec.name, model, list(MULTILABEL_TASKS), result.tables, context.run_id,
                               split_id)
        meta = {"dagster/row_count": len(metrics), "level": targets.level, "kind": targets.kind,
                "text_tower": text is not None, "per_label AUC": markdown_table(_label_table(result.per_label), 30)}
        for task, summary in result.summary.items():
            meta[f"{task}/macro_auc"] = float(summary["macro_auc"])
            meta[f"{task}/micro_auc"] = float(summary["micro_auc"])
        if text is not None:
            meta["prompts"] = markdown_table(pd.DataFrame({"label": targets.names, "positive": text.positive,
                                                           "negative": text.negative}), 30)
        meta.update(evaluation_metadata(result.tables, split_id))
        return dg.MaterializeResult(metadata=meta)

    return multilabel_metrics


def alignment_head_asset(catalog: Catalog, spec: DatasetSpec) -> dg.AssetsDefinition:
    @dg.asset(key=[spec.name, "alignment_head"], group_name=spec.name, kinds={"pytorch", "safetensors", "duckdb"},
              partitions_def=model_partitions(catalog, spec),
              deps=[dg.AssetKey([spec.name, s]) for s in ("image_embeddings", "splits")],
              pool="duckdb_writer", automation_condition=dg.AutomationCondition.eager(),
              description="A linear projection of frozen image embeddings onto the label-prompt embeddings, trained "
                          "on the train split with MedCLIP's semantic-matching loss (seeded), saved as safetensors; "
                          "test-split AUC per label and its difference to zero-shot. Skipped without a text tower.")
    def alignment_head(context: dg.AssetExecutionContext, storage: NfhmStorage, torch_device: TorchDevice):
        model = context.partition_key
        embedder = load_model(catalog, model, storage, torch_device)
        if not embedder.has_text_tower:
            # Clear rows a former text-tower model under this key may have left.
            store_tables(storage, spec.name, model, [ALIGNMENT_TASK], EvalTables(), context.run_id,
                         current_split_id(storage, spec.name))
            return dg.MaterializeResult(metadata={"skipped": f"{model} has no text tower", "text_tower": False,
                                                  "dagster/row_count": 0})
        frame, vectors, targets, split_id = _inputs(storage, spec, model)
        text = embed_label_texts(embedder, spec, targets)
        result = alignment_tables(frame, vectors, targets, text, seed=spec.split.seed,
                                  device=str(embedder.device))
        path = result.head.save(alignment_head_path(storage.subdir("models"), spec.name, model))
        metrics = store_tables(storage, spec.name, model, [ALIGNMENT_TASK], result.auc.tables, context.run_id,
                               split_id)
        comparison = result.comparison
        summary = result.auc.summary[ALIGNMENT_TASK]
        return dg.MaterializeResult(metadata={
            "dagster/row_count": len(metrics), "path": dg.MetadataValue.path(str(path)), "level": targets.level,
            "seed": spec.split.seed, "epochs": len(result.head.loss_history),
            "loss_first_epoch": float(result.head.loss_history[0]), "loss_last_epoch": float(result.head.loss_history[-1]),
            "macro_auc": float(summary["macro_auc"]), "micro_auc": float(summary["micro_auc"]),
            "helps (vs zero-shot)": markdown_table(comparison, 30, floatfmt="{:.4f}"),
            "labels_better": int((comparison["mark"] == "better").sum()),
            "labels_worse": int((comparison["mark"] == "worse").sum()),
            "label_texts": text.positive,
            **evaluation_metadata(result.auc.tables, split_id),
        })

    return alignment_head

