"""Stage 4: every model's results for one dataset → charts, tables, a markdown summary, one HTML file."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from nfhm_pipeline.reports.plots import (confusion_figure, knn_group_bars, probe_table, save_png, speed_bars,
                                         zero_shot_table)
from nfhm_pipeline.reports.summary import markdown_summary, rank_models

RULE_PAIRS = {"cosine": ("top1_cosine", "mean_cosine"), "euclidean": ("top1_euclidean", "mean_euclidean")}


@dataclass
class ComparisonReport:
    summary_markdown: str
    images: dict[str, Path] = field(default_factory=dict)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    html: Path | None = None
    html_sections: dict[str, str] = field(default_factory=dict)


def best_model(metrics: pd.DataFrame, level: str) -> str | None:
    rows = metrics[(metrics["task"] == "knn") & (metrics["metric"] == "top1_cosine") & (metrics["grp"] == "all")
                   & (metrics["level"] == level)]
    if rows.empty:
        return None
    # Ties go to the model name that sorts first, so the choice is stable.
    rows = rows.sort_values(["value", "model"], ascending=[False, True])
    return str(rows["model"].iloc[0])


def build_comparison(dataset: str, levels, metrics: pd.DataFrame, runs: pd.DataFrame, predictions: pd.DataFrame,
                     out_dir: Path) -> ComparisonReport:
    from nfhm_pipeline.reports.html import write_html_report

    out_dir.mkdir(parents=True, exist_ok=True)
    report = ComparisonReport(summary_markdown=markdown_summary(metrics, runs, dataset))
    knn = metrics[metrics["task"] == "knn"]
    for level in levels:
        if knn[knn["level"] == level].empty:
            continue
        for name, pair in RULE_PAIRS.items():
            fig = knn_group_bars(knn, level=level, rule_pair=pair)
            report.images[f"knn_{name}_{level}"] = save_png(fig, out_dir / f"knn_{name}_{level}.png")
        model = best_model(metrics, level)
        pred = predictions[(predictions["model"] == model) & (predictions["level"] == level)
                           & (predictions["rule"] == "top1_cosine") & (predictions["grp"] == "all")
                           & (predictions["task"] == "knn")]
        if len(pred):
            labels = sorted(set(pred["true_label"]) | set(pred["predicted_label"]))
            fig = confusion_figure(pred["true_label"].to_numpy(), pred["predicted_label"].to_numpy(), labels,
                                   title=f"{dataset} — {level}: {model}, top-1 cosine (row %)")
            report.images[f"confusion_{level}"] = save_png(fig, out_dir / f"confusion_{level}.png")
            wrong = pred[pred["true_label"] != pred["predicted_label"]]
            pairs = (wrong.groupby(["true_label", "predicted_label"]).size().rename("count").reset_index()
                     .sort_values(["count", "true_label", "predicted_label"], ascending=[False, True, True]).head(10))
            report.tables[f"most confused pairs — {level} ({model})"] = pairs
    runs = runs[runs["dataset"] == dataset] if len(runs) else runs
    if len(runs) and (runs["new"] > 0).any():
        report.images["embedding_speed"] = save_png(speed_bars(runs, dataset=dataset), out_dir / "embedding_speed.png")
    report.tables["ranking (top-1 cosine, all groups)"] = rank_models(metrics)
    for task, title in (("linear_probe", "linear probe (LinearSVC, C = 100/N): CV accuracy mean ± std"),
                        ("logistic_probe", "logistic probe: CV accuracy mean ± std")):
        if (metrics["task"] == task).any():
            report.tables[title] = probe_table(metrics, task=task, metric="cv_accuracy").reset_index()
    if (metrics["task"] == "zero_shot").any():
        report.tables["zero-shot accuracy"] = zero_shot_table(metrics).reset_index()
    add_auc_comparisons(report, metrics)
    report.html = write_html_report(out_dir / f"{dataset}_report.html", dataset=dataset,
                                    summary_markdown=report.summary_markdown, tables=report.tables,
                                    images=report.images, html_sections=report.html_sections)
    return report


def add_auc_comparisons(report: ComparisonReport, metrics: pd.DataFrame) -> None:
    """Seed 003's per-label AUC difference tables (green better / red worse beyond 0.5 points):
    every model's probe against the first baseline, and each alignment head against zero-shot."""
    from nfhm_pipeline.stages.multilabel import PROBE_TASK, auc_difference_report

    probe_models = sorted(metrics.loc[metrics["task"] == PROBE_TASK, "model"].unique())
    if len(probe_models) > 1:
        base = "raw-pixels" if "raw-pixels" in probe_models else probe_models[0]
        for other in (m for m in probe_models if m != base):
            table, fragment = auc_difference_report(metrics, base, other)
            report.tables[f"probe AUC: {other} vs {base}"] = table
            report.html_sections[f"probe AUC difference: {other} vs {base}"] = fragment
    for model in sorted(metrics.loc[metrics["task"] == "alignment_head", "model"].unique()):
        table, fragment = auc_difference_report(metrics, model, model, task="multilabel_zero_shot",
                                                task_b="alignment_head")
        report.tables[f"alignment head vs zero-shot AUC: {model}"] = table
        report.html_sections[f"alignment head vs zero-shot AUC: {model}"] = fragment


def label_arrays(manifest: pd.DataFrame, image_ids: np.ndarray, levels) -> dict[str, np.ndarray]:
    m = manifest.set_index("image_id")
    return {level: m.loc[image_ids, level].astype(str).to_numpy() for level in levels}
