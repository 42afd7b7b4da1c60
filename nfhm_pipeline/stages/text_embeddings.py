"""``<dataset>/text_embeddings``, per model: every text the dataset's evaluations compare images
with, embedded once by the model's text tower and stored in the lake.

* class prompts (``use`` = ``zero_shot``): every template × class × label level, for zero-shot
  and retrieval;
* on datasets scored by AUC (`evaluates_auc`), the label prompts (``auc_positive`` /
  ``auc_negative``) of the classes or findings in the split, for ``multilabel_metrics`` and
  ``alignment_head``, which read them here instead of loading the model again.

A model without a text tower gets an empty table, so downstream stages can tell "no text tower"
from "not run".

The prompts are known before the model is: when the stored table holds exactly them under the
model's current fingerprint (known without loading, as in ``image_embeddings``), the run keeps it
and loads no model.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from nfhm_pipeline.stages.base import Device, Location, Log, Paths, StageResult, markdown_table, quiet, read_manifest, read_split
from nfhm_pipeline.store.schemas import TEXT_PROMPT_COLUMNS, TEXT_USE_ZERO_SHOT

DESCRIPTION = ("Class-prompt text embeddings (every template × class × label level), and the label prompts of "
               "AUC-scored datasets, for models with a text tower; an empty table for the others.")


def run(dataset, model, paths: Paths, device: Device, *, run_id: str | None = None, log: Log = quiet) -> StageResult:
    from nfhm_pipeline.embedders.runtime import embed_prompts
    from nfhm_pipeline.stages.image_embeddings import known_model, load_model, model_spec
    from nfhm_pipeline.store.text_store import text_path, write_text_embeddings

    spec = model_spec(model, paths)
    facts = known_model(spec, paths, device)
    manifest = read_manifest(paths, dataset.name)
    class_prompts, label_rows = _prompt_tables(dataset, manifest, paths)
    n_label_prompts = len(label_rows)
    prompts = class_prompts.assign(use=TEXT_USE_ZERO_SHOT)
    if n_label_prompts:
        prompts = pd.concat([prompts, label_rows], ignore_index=True)
    if facts is not None:
        kept = _stored_if_current(paths, dataset.name, model.key, facts, prompts)
        if kept is not None:
            log(f"{dataset.name}/{model.key}: the stored text embeddings are this run's prompts under the model's "
                f"current fingerprint {facts.fingerprint[:12]}: kept, model not loaded")
            if not facts.has_text_tower:
                return StageResult(metadata={"dagster/row_count": 0, "text_tower": False, "model_loaded": False})
            return _result(prompts, kept.shape[1], n_label_prompts,
                           text_path(paths.lake, dataset.name, model.key), loaded=False)
    embedder = load_model(model, paths, device, spec)
    if not embedder.has_text_tower:
        write_text_embeddings(paths.lake, dataset.name, model.key, None, None, embedder.fingerprint)
        return StageResult(metadata={"dagster/row_count": 0, "text_tower": False, "model_loaded": True})
    vectors = embed_prompts(embedder, class_prompts)
    if n_label_prompts:  # one call for the label prompts (positives, then negatives)
        label_vectors = np.asarray(embedder.embed_texts(label_rows["prompt"].tolist()), dtype=np.float32)
        vectors = np.concatenate([vectors, label_vectors])
    path = write_text_embeddings(paths.lake, dataset.name, model.key, prompts, vectors, embedder.fingerprint)
    return _result(prompts, int(vectors.shape[1]), n_label_prompts, path, loaded=True)


def _result(prompts: pd.DataFrame, dim: int, n_label_prompts: int, path: str, *, loaded: bool) -> StageResult:
    return StageResult(metadata={
        "dagster/row_count": len(prompts), "text_tower": True, "path": Location(path),
        "templates": len(prompts["template"].unique()), "dim": int(dim),
        "label_prompts": n_label_prompts, "preview": markdown_table(prompts.head(5)), "model_loaded": loaded,
    })


def _prompt_tables(dataset, manifest: pd.DataFrame, paths: Paths) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(class prompts: every template × class × label level; the AUC label prompts of the split's
    classes or findings, positives then negatives, empty unless the dataset is scored by AUC)."""
    from nfhm_pipeline.embedders.runtime import text_prompt_table
    from nfhm_pipeline.evaluation.multilabel_tables import (
        attach_findings, auc_targets, evaluates_auc, label_prompt_table,
    )
    from nfhm_pipeline.evaluation.prompts import templates_for

    classes = {level: sorted(manifest[level].dropna().unique()) for level in dataset.labels}
    class_prompts = text_prompt_table(classes, templates_for(dataset.prompts))
    if not evaluates_auc(dataset):
        return class_prompts, pd.DataFrame(columns=[*TEXT_PROMPT_COLUMNS])
    splits = read_split(paths, dataset.name)
    frame = splits[["image_id", "split", "fold"]].merge(manifest[["image_id", *dataset.labels]], on="image_id",
                                                        how="left")
    targets = auc_targets(dataset, attach_findings(frame, manifest, dataset))
    return class_prompts, label_prompt_table(dataset, targets)


def _stored_if_current(paths: Paths, dataset: str, model: str, facts, prompts: pd.DataFrame):
    """The stored vectors when the lake's table holds exactly ``prompts`` (as written: strings) under
    ``facts.fingerprint`` (an empty table for a model without a text tower); else None."""
    from nfhm_pipeline.store.text_store import read_text_embeddings, text_path

    lake = paths.lake
    if lake.file_fingerprint(text_path(lake, dataset, model)) != facts.fingerprint:
        return None
    stored = read_text_embeddings(lake, dataset, model)
    if stored is None:
        return None
    stored_prompts, vectors = stored
    if not facts.has_text_tower:
        return vectors if len(stored_prompts) == 0 else None
    as_written = [prompts[c].astype(str).tolist() for c in TEXT_PROMPT_COLUMNS]
    if [stored_prompts[c].astype(str).tolist() for c in TEXT_PROMPT_COLUMNS] != as_written:
        return None
    return vectors
