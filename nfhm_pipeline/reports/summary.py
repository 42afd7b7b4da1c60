"""Model rankings, result pivots and a short markdown summary from the warehouse tables.

Tables returned here keep metric values as fractions in [0, 1] unless a function says otherwise;
only the markdown shows percent (one decimal).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from nfhm_pipeline.errors import EvaluationError
from nfhm_pipeline.reports.plots import rule_title, select_rows

KNN_RULES = ("top1_cosine", "mean_cosine", "top1_euclidean", "mean_euclidean")
RUN_COLUMNS = ["dataset", "model", "new", "seconds", "images_per_s", "device", "finished_at"]


def throughput_table(embedding_runs: pd.DataFrame, *, dataset: str | None = None) -> pd.DataFrame:
    """One row per (dataset, model): its latest run (by finished_at) that embedded new images.

    Columns: dataset, model, embedded (images embedded in that run), seconds, images_per_s
    (taken from the table, or embedded / seconds where missing), device, batch_size, finished_at.
    Runs that only reused stored embeddings are left out: their speed says nothing.
    """
    missing = [c for c in RUN_COLUMNS if c not in embedding_runs.columns]
    if missing:
        raise EvaluationError(f"embedding_runs lacks column(s) {missing}; it has {list(embedding_runs.columns)}")
    runs = embedding_runs[embedding_runs["new"] > 0]
    if dataset is not None:
        runs = runs[runs["dataset"] == dataset]
    runs = runs.sort_values("finished_at").groupby(["dataset", "model"], as_index=False).tail(1)
    speed = runs["images_per_s"].astype(float).fillna(runs["new"] / runs["seconds"])
    batch = runs["batch_size"] if "batch_size" in runs.columns else pd.Series(pd.NA, index=runs.index)
    out = pd.DataFrame({
        "dataset": runs["dataset"], "model": runs["model"], "embedded": runs["new"].astype(int),
        "seconds": runs["seconds"].astype(float), "images_per_s": speed, "device": runs["device"],
        "batch_size": batch, "finished_at": runs["finished_at"],
    })
    return out.sort_values(["dataset", "model"]).reset_index(drop=True)


def _all_group_values(metrics: pd.DataFrame, task: str, names) -> pd.DataFrame:
    """Wide frame indexed by (dataset, level, model) with one column per metric (grp == 'all')."""
    rows = select_rows(metrics, task=task, grp="all", metric=list(names))
    wide = rows.pivot(index=["dataset", "level", "model"], columns="metric", values="value")
    return wide.reindex(columns=list(names))


def rank_models(metrics: pd.DataFrame, *, level: str | None = None) -> pd.DataFrame:
    """Models ranked per (dataset, level) by whole-dataset (grp 'all') k-NN top1_cosine.

    Columns: dataset, level, rank, model, top1_cosine, mean_cosine, plus probe_accuracy and
    probe_accuracy_std (linear_probe 'accuracy' value and CV std) when any probe result exists.
    Ties share the best rank (1, 1, 3) and are listed by mean_cosine, then model name; models
    without top1_cosine come last with rank <NA>. Values are fractions.
    """
    knn = _all_group_values(metrics, "knn", ("top1_cosine", "mean_cosine"))
    probe = select_rows(metrics, task="linear_probe", grp="all", metric="accuracy")
    if not probe.empty:
        std = probe["std"] if "std" in probe.columns else np.nan
        probe = probe.assign(probe_accuracy=probe["value"], probe_accuracy_std=std)
        knn = knn.join(probe.set_index(["dataset", "level", "model"])[["probe_accuracy", "probe_accuracy_std"]],
                       how="left")
    table = knn.reset_index()
    if level is not None:
        table = table[table["level"] == level]
        if table.empty:
            raise EvaluationError(f"no k-NN metrics for level {level!r}; levels present: "
                                  f"{sorted(knn.index.get_level_values('level').unique())}")
    table = table.sort_values(["dataset", "level", "top1_cosine", "mean_cosine", "model"],
                              ascending=[True, True, False, False, True], na_position="last")
    table["rank"] = (table.groupby(["dataset", "level"])["top1_cosine"]
                     .rank(method="min", ascending=False).astype("Int64"))
    first = ["dataset", "level", "rank", "model"]
    table = table[first + [c for c in table.columns if c not in first]]
    table.columns.name = None
    return table.reset_index(drop=True)


def metrics_pivot(
    metrics: pd.DataFrame, task: str = "knn", grp: str = "all", *,
    dataset: str | None = None, percent: bool = True,
) -> pd.DataFrame:
    """Result table for the terminal: rows = model, columns = (level, metric).

    Values are percent rounded to one decimal when `percent` (default), else the stored fractions.
    Needs one dataset: pass `dataset` when the table holds several.
    """
    rows = select_rows(metrics, task=task, grp=grp, dataset=dataset)
    if rows["dataset"].nunique() > 1:
        raise EvaluationError(f"metrics holds datasets {sorted(rows['dataset'].unique())}; "
                              "pass dataset= to choose one")
    table = rows.pivot(index="model", columns=["level", "metric"], values="value").sort_index(axis=1)
    table.columns.names = ["level", "metric"]
    return (100 * table).round(1) if percent else table


# ---------------------------------------------------------------- markdown
def _pct(value) -> str:
    return "—" if value is None or pd.isna(value) else f"{100 * float(value):.1f}%"


def _md_table(header: list[str], body: list[list[str]]) -> str:
    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
    return "\n".join([line(header), line(["---"] * len(header))] + [line(r) for r in body])


def markdown_summary(metrics: pd.DataFrame, embedding_runs: pd.DataFrame, dataset: str) -> str:
    """A short markdown report for one dataset: the best model per level and k-NN rule (ties
    listed together), the ranking table per level and the embedding speed table. Percent with
    one decimal."""
    parts = [f"## {dataset}"]
    metrics = metrics[metrics["dataset"] == dataset]
    knn = _all_group_values(metrics, "knn", KNN_RULES)
    if knn.empty:
        parts.append("No k-NN metrics yet.")
    else:
        best = []
        for lvl, frame in knn.groupby(level="level", sort=True):
            for rule in KNN_RULES:
                scores = frame[rule].droplevel(["dataset", "level"]).dropna()
                if not scores.empty:
                    winners = sorted(scores.index[scores == scores.max()])
                    best.append([lvl, rule_title(rule), ", ".join(winners), _pct(scores.max())])
        parts += ["### Best model per level and rule (whole dataset)",
                  _md_table(["level", "rule", "best model", "accuracy"], best)]
        ranking = rank_models(metrics)
        has_probe = "probe_accuracy" in ranking.columns
        for lvl, frame in ranking.groupby("level", sort=True):
            header = ["rank", "model", "top-1 cosine", "mean cosine"] + (["linear probe"] if has_probe else [])
            body = [[("—" if pd.isna(r["rank"]) else int(r["rank"])), r["model"], _pct(r["top1_cosine"]),
                     _pct(r["mean_cosine"])] + ([_pct(r["probe_accuracy"])] if has_probe else [])
                    for _, r in frame.iterrows()]
            parts += [f"### Ranking — {lvl}", _md_table(header, body)]
    speed = throughput_table(embedding_runs, dataset=dataset)
    parts.append("### Embedding speed")
    if speed.empty:
        parts.append("No embedding runs recorded.")
    else:
        parts.append(_md_table(
            ["model", "images", "seconds", "images/s", "device"],
            [[r.model, f"{r.embedded:,}", f"{r.seconds:,.1f}", f"{r.images_per_s:,.1f}", r.device]
             for r in speed.sort_values("images_per_s", ascending=False).itertuples()],
        ))
    return "\n\n".join(parts) + "\n"
