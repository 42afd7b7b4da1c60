"""Stage 4: every model's current results for one dataset → charts (PNG + SVG), tables, a markdown
summary and one HTML file; and the UMAP maps of one model's embeddings.

Only rows computed on the dataset's current split are compared (``store.provenance``); models with
rows of an earlier split are named as needing a re-run. Every file name built from a dataset,
model or level name goes through ``reports.files.inside``, so none lands outside the report folder,
and every write failure (a full disk included) is a StorageError naming the file.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from nfhm_pipeline.errors import StorageError
from nfhm_pipeline.evaluation import names
from nfhm_pipeline.evaluation.classification import confusion_pairs
from nfhm_pipeline.reports.files import ensure_dir, inside, safe_name
from nfhm_pipeline.reports.plots import (confusion_figure, knn_group_bars, probe_table, retrieval_table, save_png,
                                         speed_bars, zero_shot_table)
from nfhm_pipeline.reports.summary import BASELINE_COLUMNS, class_baselines, markdown_summary
from nfhm_pipeline.store import provenance, warehouse

RULE_PAIRS = {"cosine": (names.TOP1_COSINE, names.MEAN_COSINE), "euclidean": (names.TOP1_EUCLIDEAN, names.MEAN_EUCLIDEAN)}
RULE_NAMES = {"cosine": "cosine rules", "euclidean": "Euclidean rules"}
RETRIEVAL_NOTE = ("Candidates: image → text ranks one prompt-ensembled text per class (the level's class texts); "
                  "text → image ranks the test images. P@k: share of the top k that are of the query's class; "
                  "R@k: share of queries with at least one of their class in the top k.")
MAPS_FOLDER = "maps"


@dataclass
class ReportInputs:
    """What the comparison reads from the warehouse, current-split rows only."""
    metrics: pd.DataFrame
    runs: pd.DataFrame
    predictions: pd.DataFrame  # k-NN top-1 cosine predictions on the whole dataset
    stale_models: list[str] = field(default_factory=list)
    baselines: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=BASELINE_COLUMNS))
    split_summary: pd.DataFrame | None = None
    rejected: pd.DataFrame | None = None
    # model_differences of the current split (every model against the best; None: no such table)
    differences: pd.DataFrame | None = None


@dataclass
class ComparisonReport:
    summary_markdown: str
    images: dict[str, Path] = field(default_factory=dict)       # key (e.g. knn_cosine_species) → PNG
    captions: dict[str, str] = field(default_factory=dict)      # key → caption in the HTML report
    level_images: dict[str, list[str]] = field(default_factory=dict)  # level → its image keys
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)     # shown in the HTML report
    table_notes: dict[str, str] = field(default_factory=dict)
    html_sections: dict[str, str] = field(default_factory=dict)
    extra_tables: dict[str, pd.DataFrame] = field(default_factory=dict)  # metadata only (shown as html_sections)
    maps: dict[str, Path] = field(default_factory=dict)          # caption → UMAP grid PNG
    stale_models: list[str] = field(default_factory=list)
    html: Path | None = None


def read_inputs(warehouse_path: str | Path, dataset: str) -> ReportInputs:
    """The dataset's current-split results, embedding runs, class baselines of the split, the
    split's facts (``split_summary`` and ``rejected_images``) and the paired comparisons of the
    current split (``model_differences``); each of the last three tolerated when absent."""
    metrics = provenance.current_rows(warehouse_path, "metrics", dataset)
    predictions = provenance.current_rows(warehouse_path, "predictions", dataset, task=names.KNN,
                                          rule=names.TOP1_COSINE, grp="all")
    labels = split_labels(warehouse_path, dataset)
    return ReportInputs(
        metrics=metrics, runs=warehouse.read_table(warehouse_path, "embedding_runs", dataset=dataset),
        predictions=predictions, stale_models=provenance.stale_models(warehouse_path, dataset),
        baselines=class_baselines(labels) if len(labels) else pd.DataFrame(columns=BASELINE_COLUMNS),
        split_summary=_optional_table(warehouse_path, "split_summary", dataset),
        rejected=_optional_table(warehouse_path, "rejected_images", dataset),
        differences=current_differences(warehouse_path, dataset))


def current_differences(warehouse_path: str | Path, dataset: str) -> pd.DataFrame | None:
    """The dataset's ``model_differences`` rows computed on its current split (rows of an earlier
    split would compare models the report no longer shows); None when the table does not exist."""
    rows = _optional_table(warehouse_path, "model_differences", dataset)
    if rows is None:
        return None
    split_id = provenance.current_split_id(warehouse_path, dataset)
    return rows[rows["split_id"] == split_id].reset_index(drop=True) if split_id else rows.iloc[0:0]


def split_labels(warehouse_path: str | Path, dataset: str) -> pd.DataFrame:
    """One row per (image of the current split, label level): image_id, split, grp, level, label."""
    path = Path(warehouse_path)
    if not path.exists() or not all(_has_table(path, t) for t in ("splits", "image_labels")):
        return pd.DataFrame(columns=["image_id", "split", "grp", "level", "label"])
    return warehouse.query(path, """
        SELECT s.image_id, s.split, s.grp, l.level, l.label
        FROM splits s JOIN image_labels l ON l.dataset = s.dataset AND l.image_id = s.image_id
        WHERE s.dataset = ?""", [dataset])


def _has_table(path: Path, table: str) -> bool:
    frame = warehouse.query(path, "SELECT count(*) AS n FROM information_schema.tables WHERE table_name = ?", [table])
    return bool(frame["n"].iloc[0])


def _optional_table(path: str | Path, table: str, dataset: str) -> pd.DataFrame | None:
    """The dataset's rows of ``table``, or None when the warehouse has no such table (older files)."""
    path = Path(path)
    if not path.exists() or not _has_table(path, table):
        return None
    return warehouse.query(path, f"SELECT * FROM {table} WHERE dataset = ?", [dataset])


def best_model(metrics: pd.DataFrame, level: str) -> str | None:
    rows = metrics[(metrics["task"] == names.KNN) & (metrics["metric"] == names.TOP1_COSINE) & (metrics["grp"] == "all")
                   & (metrics["level"] == level)]
    if rows.empty:
        return None
    # Ties go to the model name that sorts first, so the choice is stable.
    rows = rows.sort_values(["value", "model"], ascending=[False, True])
    return str(rows["model"].iloc[0])


def report_folder(reports_root: str | Path, dataset: str) -> Path:
    """``<reports_root>/<dataset>``, created; the dataset name made a safe folder name."""
    return ensure_dir(inside(ensure_dir(reports_root), dataset))


def map_path(maps_root: str | Path, model: str, level: str) -> Path:
    """``<maps_root>/<model>/umap_<level>.png``: a folder per model, so (model ``rp``, level
    ``genus_species``) and (``rp_genus``, ``species``) never share a file."""
    return inside(maps_root, model, f"umap_{safe_name(level)}.png")


def run_comparison(dataset: str, levels, warehouse_path: str | Path, reports_root: str | Path) -> ComparisonReport:
    """The whole comparison stage: read the current results, write the report files, return them."""
    inputs = read_inputs(warehouse_path, dataset)
    if inputs.metrics.empty:
        stale = (f"; the stored results of {', '.join(inputs.stale_models)} were computed on an earlier split: "
                 "re-materialize their metric assets" if inputs.stale_models else
                 ": materialize its metric assets first")
        raise StorageError(f"no metrics for {dataset!r} on its current split{stale}")
    return build_comparison(dataset, levels, inputs, report_folder(reports_root, dataset))


def build_comparison(dataset: str, levels, inputs: ReportInputs, out_dir: Path) -> ComparisonReport:
    """Charts, tables, summary and the HTML report for ``inputs`` in ``out_dir``."""
    from nfhm_pipeline.reports.html import write_html_report

    metrics, baselines = inputs.metrics, inputs.baselines
    out_dir = ensure_dir(out_dir)
    report = ComparisonReport(
        summary_markdown=markdown_summary(metrics, inputs.runs, dataset, baselines=baselines,
                                          stale_models=inputs.stale_models, split_summary=inputs.split_summary,
                                          rejected=inputs.rejected, differences=inputs.differences),
        stale_models=list(inputs.stale_models))

    def add_image(key: str, level: str | None, fig, file_name: str, caption: str) -> None:
        report.images[key] = save_png(fig, inside(out_dir, file_name), svg=True)
        report.captions[key] = caption
        if level is not None:
            report.level_images.setdefault(level, []).append(key)

    knn = metrics[metrics["task"] == names.KNN]
    predictions = inputs.predictions
    for level in levels:
        if knn[knn["level"] == level].empty:
            continue
        slug = safe_name(level)
        level_base = baselines[baselines["level"] == level]
        for name, pair in RULE_PAIRS.items():
            fig = knn_group_bars(knn, level=level, rule_pair=pair, baselines=level_base)
            add_image(f"knn_{name}_{level}", level, fig, f"knn_{name}_{slug}.png",
                      f"k-NN accuracy by group, {RULE_NAMES[name]} — {level}")
        model = best_model(metrics, level)
        pred = predictions[(predictions["model"] == model) & (predictions["level"] == level)]
        if len(pred):
            true, guess = pred["true_label"].astype(object), pred["predicted_label"].astype(object)
            guess = guess.where(guess.notna(), "(no prediction)")
            labels = sorted(set(true) | set(guess), key=str)
            fig = confusion_figure(true.to_numpy(), guess.to_numpy(), labels,
                                   title=f"{dataset} — {level}: {model}, top-1 cosine (row %)")
            add_image(f"confusion_{level}", level, fig, f"confusion_{slug}.png",
                      f"confusion matrix of the best model ({model}, top-1 cosine) — {level}")
            pairs = confusion_pairs(true.to_numpy(), guess.to_numpy(), top=10).rename(
                columns={"true": "true class", "predicted": "predicted as", "count": "test images"})
            report.tables[f"most confused pairs — {level} ({model})"] = pairs
    runs = inputs.runs[inputs.runs["dataset"] == dataset] if len(inputs.runs) else inputs.runs
    if len(runs) and (runs["new"] > 0).any():
        add_image("embedding_speed", None, speed_bars(runs, dataset=dataset), "embedding_speed.png",
                  "embedding throughput")
    for task, title in ((names.LINEAR_PROBE, "linear probe (LinearSVC, C = 100/N): CV accuracy mean ± std"),
                        (names.LOGISTIC_PROBE, "logistic probe: CV accuracy mean ± std")):
        if ((metrics["task"] == task) & (metrics["metric"] == names.CV_ACCURACY)).any():
            report.tables[title] = probe_table(metrics, task=task, metric=names.CV_ACCURACY, baselines=baselines)
            report.table_notes[title] = ("Mean ± std over the split's cross-validation folds of the training images. "
                                         "Baselines are on the test split.")
    if (metrics["task"] == names.ZERO_SHOT).any():
        report.tables["zero-shot accuracy"] = zero_shot_table(metrics, baselines=baselines)
    if (metrics["task"] == names.RETRIEVAL).any():
        title = "image ↔ text retrieval (%)"
        report.tables[title] = retrieval_table(metrics, baselines=baselines)
        report.table_notes[title] = RETRIEVAL_NOTE
    add_auc_comparisons(report, metrics, inputs.differences)
    maps_root = out_dir / MAPS_FOLDER
    for model in sorted(metrics["model"].astype(str).unique()):
        for level in levels:
            path = map_path(maps_root, model, level)
            if path.exists():
                report.maps[f"UMAP of {model} coloured by {level}"] = path
    report.html = write_html_report(
        inside(out_dir, f"{safe_name(dataset)}_report.html"), dataset=dataset,
        summary_markdown=report.summary_markdown, tables=report.tables, table_notes=report.table_notes,
        images={report.captions[k]: p for k, p in report.images.items()}, html_sections=report.html_sections,
        image_sections={"Embedding maps (UMAP)": report.maps} if report.maps else None)
    return report


def add_auc_comparisons(report: ComparisonReport, metrics: pd.DataFrame,
                        differences: pd.DataFrame | None = None) -> None:
    """Seed 003's per-label AUC difference tables: every model's probe against the first baseline,
    and each alignment head against zero-shot. With ``differences`` (the dataset's current
    ``model_differences`` rows) a difference is green (better) / red (worse) only beyond 0.5 points
    AND with a paired p < 0.05 (DeLong's per label, the paired bootstrap's for macro / micro AUC),
    else grey (no detectable difference); without them, the
    seed's rule (beyond 0.5 points). Each is shown once in the HTML report (the coloured fragment);
    the plain table goes to the metadata only."""
    from nfhm_pipeline.evaluation.multilabel_tables import auc_difference_report

    probe_models = sorted(metrics.loc[metrics["task"] == names.MULTILABEL_PROBE, "model"].unique())
    if len(probe_models) > 1:
        base = "raw-pixels" if "raw-pixels" in probe_models else probe_models[0]
        for other in (m for m in probe_models if m != base):
            table, fragment = auc_difference_report(metrics, base, other, differences=differences)
            report.extra_tables[f"probe AUC: {other} vs {base}"] = table
            report.html_sections[f"probe AUC difference: {other} vs {base}"] = fragment
    for model in sorted(metrics.loc[metrics["task"] == names.ALIGNMENT_HEAD, "model"].unique()):
        table, fragment = auc_difference_report(metrics, model, model, task=names.MULTILABEL_ZERO_SHOT,
                                                task_b=names.ALIGNMENT_HEAD, differences=differences)
        report.extra_tables[f"alignment head vs zero-shot AUC: {model}"] = table
        report.html_sections[f"alignment head vs zero-shot AUC: {model}"] = fragment


def label_arrays(manifest: pd.DataFrame, image_ids: np.ndarray, levels) -> dict[str, np.ndarray]:
    m = manifest.set_index("image_id")
    return {level: m.loc[image_ids, level].astype(str).to_numpy() for level in levels}


def draw_maps(dataset: str, model: str, vectors: np.ndarray, labels: dict[str, np.ndarray], grid: dict, seed: int,
              reports_root: str | Path) -> dict[str, Path]:
    """The embedding-maps stage: one UMAP grid per level (PNG + SVG) at :func:`map_path`."""
    from nfhm_pipeline.reports.maps import umap_grid

    figures = umap_grid(vectors, labels, n_neighbors=grid["n_neighbors"], min_dist=grid["min_dist"],
                        max_points=grid["max_points"], seed=seed, title_prefix=f"{dataset} — {model}")
    maps_root = report_folder(reports_root, dataset) / MAPS_FOLDER
    return {level: save_png(fig, map_path(maps_root, model, level), svg=True) for level, fig in figures.items()}
