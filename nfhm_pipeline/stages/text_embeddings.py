"""``<dataset>/text_embeddings``, per model: every text the dataset's evaluations compare images
with, embedded once by the model's text tower and stored in the lake.

* class prompts (``use`` = ``zero_shot``): every template × class × label level, for zero-shot
  and retrieval;
* on datasets scored by AUC (`evaluates_auc`), the label prompts (``auc_positive`` /
  ``auc_negative``) of the classes or findings in the split, for ``multilabel_metrics`` and
  ``alignment_head``, which read them here instead of loading the model again.

A model without a text tower gets an empty table, so downstream stages can tell "no text tower"
from "not run".
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from nfhm_pipeline.stages.base import Device, Location, Log, Paths, StageResult, markdown_table, quiet, read_manifest, read_split

DESCRIPTION = ("Class-prompt text embeddings (every template × class × label level), and the label prompts of "
               "AUC-scored datasets, for models with a text tower; an empty table for the others.")


def run(dataset, model, paths: Paths, device: Device, *, run_id: str | None = None, log: Log = quiet) -> StageResult:
    from nfhm_pipeline.embedders.runtime import embed_prompts, text_prompt_table
    from nfhm_pipeline.evaluation.multilabel_tables import evaluates_auc
    from nfhm_pipeline.evaluation.prompts import templates_for
    from nfhm_pipeline.stages.image_embeddings import load_model
    from nfhm_pipeline.store.text_store import write_text_embeddings

    embedder = load_model(model, paths, device)
    if not embedder.has_text_tower:
        write_text_embeddings(paths.lake, dataset.name, model.key, None, None, embedder.fingerprint)
        return StageResult(metadata={"dagster/row_count": 0, "text_tower": False})
    manifest = read_manifest(paths, dataset.name)
    classes = {level: sorted(manifest[level].dropna().unique()) for level in dataset.labels}
    prompts = text_prompt_table(classes, templates_for(dataset.prompts))
    vectors = embed_prompts(embedder, prompts)
    n_label_prompts = 0
    if evaluates_auc(dataset):
        label_rows, label_vectors = _label_prompts(dataset, manifest, read_split(paths, dataset.name), embedder)
        n_label_prompts = len(label_rows)
        prompts = pd.concat([prompts.assign(use="zero_shot"), label_rows], ignore_index=True)
        vectors = np.concatenate([vectors, label_vectors])
    path = write_text_embeddings(paths.lake, dataset.name, model.key, prompts, vectors, embedder.fingerprint)
    return StageResult(metadata={
        "dagster/row_count": len(prompts), "text_tower": True, "path": Location(path),
        "templates": len(prompts["template"].unique()), "dim": int(vectors.shape[1]),
        "label_prompts": n_label_prompts, "preview": markdown_table(prompts.head(5)),
    })


def _label_prompts(dataset, manifest: pd.DataFrame, splits: pd.DataFrame, embedder):
    """The AUC label prompts of the split's classes (or the findings) and their embeddings,
    embedded in one call (positives, then negatives)."""
    from nfhm_pipeline.evaluation.multilabel_tables import attach_findings, auc_targets, label_prompt_table

    frame = splits[["image_id", "split", "fold"]].merge(manifest[["image_id", *dataset.labels]], on="image_id",
                                                        how="left")
    targets = auc_targets(dataset, attach_findings(frame, manifest, dataset))
    rows = label_prompt_table(dataset, targets)
    vectors = np.asarray(embedder.embed_texts(rows["prompt"].tolist()), dtype=np.float32)
    return rows, vectors
