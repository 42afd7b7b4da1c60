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

    report = run_comparison(dataset.name, dataset.labels, paths.warehouse, paths.reports)
    return StageResult(metadata=comparison_metadata(report))


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
