"""``<dataset>/model_comparison``: every model's results on the dataset's current split side by
side (models with results of an earlier split are named, not compared), written as charts (PNG +
SVG), tables and one self-contained HTML report under ``reports/<dataset>/``."""
from __future__ import annotations

from nfhm_pipeline.stages.base import Device, Log, Markdown, Paths, StageResult, markdown_table, quiet

DESCRIPTION = ("Every model's results on the dataset's current split side by side (models with results of an "
               "earlier split are named, not compared): the seed's grouped bar charts per rule and level with "
               "majority-class and chance lines, confusion matrix of the best model, probe, zero-shot and retrieval "
               "tables, UMAP grids, embedding speed, the split's facts, a ranking summary, and one self-contained "
               "HTML report (charts also as SVG). Paired tests go to table model_differences: bootstrap and McNemar "
               "on predictions, DeLong per label on the per-image AUC scores, and a paired bootstrap over the "
               "test images for macro and micro AUC.")


def run(dataset, model=None, paths: Paths | None = None, device: Device | None = None, *,
        run_id: str | None = None, log: Log = quiet) -> StageResult:
    from nfhm_pipeline.evaluation.auc_differences import AUC_TASKS, DELONG_TEST
    from nfhm_pipeline.reports.comparison import run_comparison

    differences = write_model_differences(dataset, paths, log)
    report = run_comparison(dataset.name, dataset.labels, paths.warehouse, paths.reports)
    meta = comparison_metadata(report)
    meta["model_differences"] = len(differences)
    if len(differences):
        columns = ["task", "level", "metric", "model_a", "model_b", "difference", "ci_low", "ci_high", "p_holm"]
        delong = differences["test"] == DELONG_TEST
        # AUC rows compare every model with every other (not with the best): no "tied with the best"
        by_auc = differences["task"].isin(AUC_TASKS)
        tied = differences[~by_auc & (differences["grp"] == "all") & (differences["p_holm"] >= 0.05)]
        meta["tied with the best (grp=all, Holm p >= 0.05)"] = markdown_table(tied[columns], 30)
        if delong.any():
            auc = differences[delong]
            meta["AUC differences (DeLong)"] = len(auc)
            meta["AUC differences with Holm p < 0.05 (DeLong)"] = markdown_table(
                auc[(auc["p_holm"] < 0.05) & (auc["difference"] > 0)][columns], 30, floatfmt="{:.4f}")
        summary = by_auc & ~delong
        if summary.any():
            auc = differences[summary]
            meta["macro/micro AUC differences (paired bootstrap)"] = len(auc)
            meta["macro/micro AUC differences with Holm p < 0.05 (paired bootstrap)"] = markdown_table(
                auc[(auc["p_holm"] < 0.05) & (auc["difference"] > 0)][columns], 30, floatfmt="{:.4f}")
    return StageResult(metadata=meta)


def write_model_differences(dataset, paths: Paths, log: Log = quiet):
    """Paired comparisons of the models' current-split predictions (every model against the best,
    bootstrap CI and p, Holm, McNemar) and of their AUCs (from ``auc_scores``: DeLong per label, the
    paired bootstrap for macro / micro AUC on the same resamples' seed, B and resample unit as the
    prediction rows), written to ``model_differences`` in one transaction."""
    import datetime as dt

    import pandas as pd

    from nfhm_pipeline.evaluation.intervals import model_differences
    from nfhm_pipeline.stages.base import read_manifest, read_split, resample_units, split_id_of, stage_seed
    from nfhm_pipeline.store import provenance, warehouse

    predictions = provenance.current_rows(paths.warehouse, "predictions", dataset.name)
    splits = read_split(paths, dataset.name)
    seed = stage_seed(dataset)
    units = resample_units(dataset, splits, read_manifest(paths, dataset.name))
    frame = model_differences(predictions, seed=seed, n_resamples=dataset.resamples, units=units)
    auc = auc_differences(paths, dataset.name, split_id_of(splits), seed=seed, n_resamples=dataset.resamples,
                          units=units)
    if len(auc):
        frame = pd.concat([f for f in (frame, auc) if len(f)], ignore_index=True)
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    frame = frame.assign(dataset=dataset.name, split_id=split_id_of(splits), created_at=now)
    warehouse.replace_many(paths.warehouse, [("model_differences", frame, {"dataset": dataset.name})], log_wait=log)
    return frame


def auc_differences(paths: Paths, dataset: str, split_id: str | None, *, seed: int, n_resamples: int,
                    units=None):
    """Paired AUC rows (``evaluation.auc_differences``) from the dataset's ``auc_scores`` of split
    ``split_id``: DeLong per label, read one label at a time so memory holds one label's scores of
    every model; then the paired bootstrap of macro / micro AUC (resamples ``counts`` of ``seed``, B
    = ``n_resamples``, whole ``units`` when given: image_id → resample unit), one level at a time."""
    import pandas as pd

    from nfhm_pipeline.evaluation.auc_differences import (DIFFERENCE_COLUMNS, bootstrap_summary_differences,
                                                          delong_differences)
    from nfhm_pipeline.store import warehouse

    empty = pd.DataFrame(columns=DIFFERENCE_COLUMNS)
    if split_id is None or not paths.warehouse.exists():
        return empty
    exists = warehouse.query(paths.warehouse, "SELECT count(*) AS n FROM information_schema.tables "
                                              "WHERE table_name = 'auc_scores'")["n"].iloc[0]
    if not exists:  # a warehouse no AUC stage has written to since the table was declared
        return empty
    keys = warehouse.query(paths.warehouse, "SELECT DISTINCT level, finding FROM auc_scores WHERE dataset = ? "
                                            "AND split_id = ? ORDER BY level, finding", [dataset, split_id])
    parts = []
    for level, finding in keys.itertuples(index=False):
        scores = warehouse.query(paths.warehouse, "SELECT model, task, level, finding, image_id, target, score "
                                                  "FROM auc_scores WHERE dataset = ? AND split_id = ? AND level = ? "
                                                  "AND finding = ?", [dataset, split_id, level, finding])
        part = delong_differences(scores)
        if len(part):
            parts.append(part)
    for level in keys["level"].drop_duplicates():  # macro / micro need every label of the level at once
        scores = warehouse.query(paths.warehouse, "SELECT model, task, level, finding, image_id, target, score "
                                                  "FROM auc_scores WHERE dataset = ? AND split_id = ? AND level = ?",
                                 [dataset, split_id, level])
        part = bootstrap_summary_differences(scores, seed=seed, n_resamples=n_resamples, units=units)
        if len(part):
            parts.append(part)
    return pd.concat(parts, ignore_index=True) if parts else empty


def comparison_metadata(report) -> dict:
    """The comparison's metadata: summary, small previews of every level's charts (full-size PNGs,
    their SVGs and the HTML report are on disk), the tables, and the models needing a re-run."""
    from nfhm_pipeline.reports.plots import png_data_uri

    meta = {
        "summary": Markdown(report.summary_markdown),
        "html_report": report.html if report.html is not None else "not written",
        "images": {name: str(path) for name, path in report.images.items()},
        "stale_models": report.stale_models,
    }
    # Previews live in the event log, so they are small, but every level gets its charts (one
    # 'charts' entry, a heading per level), within about 240 kB in all.
    groups = {**report.level_images, "embedding speed": [k for k in report.images if k == "embedding_speed"]}
    n_images = sum(len(keys) for keys in groups.values())
    budget = max(12_000, 240_000 // max(n_images, 1))
    sections = [f"#### {name}\n\n" + "\n\n".join(
        f"![{key}]({png_data_uri(report.images[key], max_width_px=480, max_bytes=budget)})" for key in keys)
        for name, keys in groups.items() if keys]
    meta["charts"] = Markdown("\n\n".join(sections) or "_(no charts)_")
    for name, frame in {**report.tables, **report.extra_tables}.items():
        shown = frame.reset_index() if any(n is not None for n in frame.index.names) else frame
        meta[f"table: {name}"] = markdown_table(shown, 15)
    return meta
