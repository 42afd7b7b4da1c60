"""Stage 3: stored embeddings + the shared split → metric tables.

Every function returns long tables shaped like the warehouse tables ``metrics``,
``per_class_metrics`` and ``predictions`` (without dataset/model/run columns,
which the caller adds). Accuracies are fractions in [0, 1].
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from nfhm_pipeline.evaluation.classification import per_class_report, summarize_predictions, topk_accuracy
from nfhm_pipeline.evaluation.knn import L2_RULES, RULES, nearest_neighbour_scores
from nfhm_pipeline.store.embedding_store import EmbeddingTable

ALL = "all"


@dataclass
class EvalTables:
    metrics: list[pd.DataFrame] = field(default_factory=list)
    per_class: list[pd.DataFrame] = field(default_factory=list)
    predictions: list[pd.DataFrame] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # one sentence per (level, group) left out

    def frames(self) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
        def cat(parts):
            return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
        return cat(self.metrics), cat(self.per_class), cat(self.predictions)


def evaluation_frame(manifest: pd.DataFrame, splits: pd.DataFrame, table: EmbeddingTable, levels) -> tuple[pd.DataFrame, np.ndarray]:
    """Rows of the split with their labels, group and vectors (aligned by image_id).

    Raises a clear error when a split image has no stored vector (embeddings stale).
    """
    from nfhm_pipeline.errors import EvaluationError

    frame = splits[["image_id", "split", "fold"]].merge(
        manifest[["image_id", "group", *levels]], on="image_id", how="left")
    index = pd.Series(np.arange(len(table.image_ids)), index=pd.Index(table.image_ids))
    pos = index.reindex(frame["image_id"]).to_numpy()
    if np.isnan(pos.astype(float)).any():
        missing = int(np.isnan(pos.astype(float)).sum())
        raise EvaluationError(f"{missing} split image(s) have no stored embedding: materialize image_embeddings "
                              "for this model again (the manifest changed since)")
    return frame.reset_index(drop=True), table.vectors[pos.astype(np.int64)]


def groups_of(frame: pd.DataFrame) -> list[str]:
    groups = sorted(frame["group"].dropna().astype(str).unique())
    return [ALL, *groups] if groups else [ALL]


def knn_tables(frame: pd.DataFrame, vectors: np.ndarray, levels, *, ks=(1, 3, 5), device=None) -> EvalTables:
    """The four nearest-neighbour rules (+ L2 Euclidean variants) per label level and group.

    Within a group, neighbours are searched among that group's train images only (as the seed
    did per taxon); ``all`` searches the whole train set. A (level, group) with no train or no
    test image is skipped and reported.
    """
    out = EvalTables()
    is_train = (frame["split"] == "train").to_numpy()
    for grp in groups_of(frame):
        in_grp = np.ones(len(frame), bool) if grp == ALL else (frame["group"].astype(str) == grp).to_numpy()
        tr, te = np.flatnonzero(in_grp & is_train), np.flatnonzero(in_grp & ~is_train)
        for level in levels:
            if len(tr) == 0 or len(te) == 0:
                out.skipped.append(f"{level}/{grp}: {len(tr)} train and {len(te)} test images")
                continue
            train_labels = frame[level].to_numpy()[tr].astype(str)
            true = frame[level].to_numpy()[te].astype(str)
            ranking = nearest_neighbour_scores(vectors[tr], train_labels, vectors[te], ks=ks, device=device)
            true_idx = ranking.class_indices(true)
            rows = []
            for rule in (*RULES, *L2_RULES):
                pred = ranking.labels(rule)
                s = summarize_predictions(true, pred)
                rows.append((rule, s["accuracy"]))
                rows.append((f"balanced_accuracy_{rule}", s["balanced_accuracy"]))
                rows.append((f"macro_f1_{rule}", s["macro_f1"]))
                for k in ks:
                    if k > 1 and k <= len(ranking.classes):
                        rows.append((f"top{k}_{rule}", topk_accuracy(true_idx, ranking.rankings[rule], k)))
                report = per_class_report(true, pred).assign(task="knn", level=level, grp=grp, rule=rule)
                out.per_class.append(report)
                out.predictions.append(pd.DataFrame({
                    "task": "knn", "level": level, "grp": grp, "rule": rule,
                    "image_id": frame["image_id"].to_numpy()[te], "true_label": true, "predicted_label": pred}))
            m = pd.DataFrame(rows, columns=["metric", "value"])
            out.metrics.append(m.assign(task="knn", level=level, grp=grp, std=np.nan, n=len(te)))
    return out


def probe_tables(frame: pd.DataFrame, vectors: np.ndarray, levels, *, seed: int = 0) -> EvalTables:
    """Standardised LinearSVC (C = 100 / N) and logistic probes per level on the shared split:
    CV over the split's train folds (mean ± std), then refit on all train and scored on test."""
    from nfhm_pipeline.errors import EvaluationError
    from nfhm_pipeline.evaluation.linear_probe import probe_on_split

    out = EvalTables()
    train = (frame["split"] == "train").to_numpy()
    folds = frame.loc[train, "fold"].to_numpy(dtype=np.int64)
    for level in levels:
        y = frame[level].astype(str).to_numpy()
        if len(np.unique(y[train])) < 2:
            out.skipped.append(f"{level}: fewer than two classes in train")
            continue
        for task, classifier in (("linear_probe", "linear_svc"), ("logistic_probe", "logistic")):
            try:
                result = probe_on_split(vectors[train], y[train], vectors[~train], y[~train], folds=folds,
                                        classifier=classifier, seed=seed)
            except EvaluationError as exc:
                out.skipped.append(f"{task}/{level}: {exc}")
                continue
            out.metrics.append(result.metrics_frame().assign(task=task, level=level, grp=ALL))
            pred = np.asarray(result.test_predictions).astype(str)
            out.per_class.append(per_class_report(y[~train], pred).assign(task=task, level=level, grp=ALL, rule=classifier))
            out.predictions.append(pd.DataFrame({
                "task": task, "level": level, "grp": ALL, "rule": classifier,
                "image_id": frame["image_id"].to_numpy()[~train], "true_label": y[~train], "predicted_label": pred}))
    return out


def zero_shot_tables(frame: pd.DataFrame, vectors: np.ndarray, prompts: pd.DataFrame, text_vectors: np.ndarray,
                     levels) -> EvalTables:
    """Zero-shot top-1/top-5 (first template vs prompt ensemble) on the test images, and
    image↔text retrieval P@K / R@K with one ensembled text per class."""
    from nfhm_pipeline.evaluation.zero_shot import ensemble_class_embeddings, retrieval_metrics, zero_shot_accuracy

    out = EvalTables()
    test = (frame["split"] == "test").to_numpy()
    for level in levels:
        p = prompts[prompts["level"] == level]
        if p.empty:
            out.skipped.append(f"{level}: no prompts")
            continue
        classes = sorted(p["class"].unique())
        templates = list(dict.fromkeys(p["template"]))
        order = {c: i for i, c in enumerate(classes)}
        tindex = {t: i for i, t in enumerate(templates)}
        emb = np.zeros((len(classes), len(templates), text_vectors.shape[1]), np.float32)
        for (cls, tpl), vec in zip(zip(p["class"], p["template"]), text_vectors[p.index.to_numpy()]):
            emb[order[cls], tindex[tpl]] = vec
        labels = frame[level].astype(str).to_numpy()[test]
        idx = np.array([order.get(c, -1) for c in labels])
        known = idx >= 0
        if not known.any():
            out.skipped.append(f"{level}: no test image has a prompted class")
            continue
        acc = zero_shot_accuracy(vectors[test][known], idx[known], emb)
        acc = acc.assign(metric=acc["metric"].str.replace("_accuracy", "") + "_" + acc["prompting"])
        out.metrics.append(pd.DataFrame({"task": "zero_shot", "level": level, "grp": ALL, "metric": acc["metric"],
                                         "value": acc["value"], "std": np.nan, "n": acc["n_images"]}))
        ret = retrieval_metrics(vectors[test][known], idx[known], ensemble_class_embeddings(emb), np.arange(len(classes)))
        out.metrics.append(pd.DataFrame({
            "task": "retrieval", "level": level, "grp": ALL,
            "metric": ret["direction"] + "_" + ret["metric"] + "@" + ret["k"].astype(str),
            "value": ret["value"], "std": np.nan, "n": int(known.sum())}))
    return out
