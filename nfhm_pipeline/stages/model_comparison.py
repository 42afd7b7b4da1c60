"""``<dataset>/model_comparison``: every model's results on the dataset's current split side by
side (models with results of an earlier split are named, not compared), written as charts (PNG +
SVG), tables and one self-contained HTML report under ``reports/<dataset>/``."""
from __future__ import annotations

from nfhm_pipeline.stages.base import Device, Log, Markdown, Paths, StageResult, markdown_table, quiet

DESCRIPTION = ("Every model's results on the dataset's current split side by side (models with results of an "
               "earlier split are named, not compared): the seed's grouped bar charts per rule and level with "
               "majority-class and chance lines, confusion matrix of the best model, probe, zero-shot and retrieval "
               "tables, UMAP grids, embedding speed, the split's facts, a ranking summary, and one self-contained "
               "HTML report (charts also as SVG).")


def run(dataset, model=None, paths: Paths | None = None, device: Device | None = None, *,
        run_id: str | None = None, log: Log = quiet) -> StageResult:
    from nfhm_pipeline.reports.comparison import run_comparison

    differences = write_model_differences(dataset, paths, log)
    report = run_comparison(dataset.name, dataset.labels, paths.warehouse, paths.reports)
    meta = comparison_metadata(report)
    meta["model_differences"] = len(differences)
    if len(differences):
        tied = differences[(differences["grp"] == "all") & (differences["p_holm"] >= 0.05)]
        meta["tied with the best (grp=all, Holm p >= 0.05)"] = markdown_table(
            tied[["task", "level", "metric", "model_a", "model_b", "difference", "ci_low", "ci_high", "p_holm"]], 30)
    return StageResult(metadata=meta)


def write_model_differences(dataset, paths: Paths, log: Log = quiet):
    """Paired comparisons of the models' current-split predictions (every model against the best,
    bootstrap CI and p, Holm, McNemar), written to ``model_differences`` in one transaction."""
    import datetime as dt

    from nfhm_pipeline.evaluation.intervals import model_differences
    from nfhm_pipeline.stages.base import read_split, resample_units, split_id_of
    from nfhm_pipeline.store import provenance, warehouse

    predictions = provenance.current_rows(paths.warehouse, "predictions", dataset.name)
    splits = read_split(paths, dataset.name)
    frame = model_differences(predictions, seed=int(dataset.seed), n_resamples=dataset.resamples,
                              units=resample_units(dataset, splits))
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    frame = frame.assign(dataset=dataset.name, split_id=split_id_of(splits), created_at=now)
    warehouse.replace_many(paths.warehouse, [("model_differences", frame, {"dataset": dataset.name})], log_wait=log)
    return frame


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
