"""``<dataset>/model_comparison`` (all models side by side) and ``<dataset>/embedding_maps`` (UMAP per model)."""
import dagster as dg

from nfhm_pipeline.assets.common import markdown_table, read_manifest
from nfhm_pipeline.assets.embeddings import model_partitions
from nfhm_pipeline.catalog import Catalog, DatasetSpec
from nfhm_pipeline.errors import StorageError
from nfhm_pipeline.reports.plots import png_data_uri
from nfhm_pipeline.resources import NfhmStorage
from nfhm_pipeline.stages.reports import ComparisonReport, draw_maps, label_arrays, run_comparison

METRIC_STAGES = ("knn_metrics", "linear_probe_metrics", "zero_shot_metrics")


def auc_stages(spec: DatasetSpec) -> tuple[str, ...]:
    from nfhm_pipeline.stages.multilabel import evaluates_auc

    return ("multilabel_metrics", "alignment_head") if evaluates_auc(spec) else ()


def comparison_asset(spec: DatasetSpec) -> dg.AssetsDefinition:
    @dg.asset(key=[spec.name, "model_comparison"], group_name=spec.name, kinds={"duckdb", "html"},
              deps=[dg.AssetKey([spec.name, s]) for s in METRIC_STAGES + auc_stages(spec)],
              automation_condition=dg.AutomationCondition.on_cron("0 6 * * *"),
              description="Every model's results on the dataset's current split side by side (models with results "
                          "of an earlier split are named, not compared): the seed's grouped bar charts per rule and "
                          "level with majority-class and chance lines, confusion matrix of the best model, probe, "
                          "zero-shot and retrieval tables, UMAP grids, embedding speed, the split's facts, a ranking "
                          "summary, and one self-contained HTML report (charts also as SVG).")
    def model_comparison(storage: NfhmStorage) -> dg.MaterializeResult:
        report = run_comparison(spec.name, spec.labels, storage.warehouse_path, storage.data_path / "reports")
        return dg.MaterializeResult(metadata=comparison_metadata(report))

    return model_comparison


def comparison_metadata(report: ComparisonReport) -> dict:
    """The comparison's metadata: summary, small previews of every level's charts (full-size PNGs,
    their SVGs and the HTML report are on disk), the tables, and the models needing a re-run."""
    meta = {
        "summary": dg.MetadataValue.md(report.summary_markdown),
        "html_report": dg.MetadataValue.path(str(report.html)),
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
    meta["charts"] = dg.MetadataValue.md("\n\n".join(sections) or "_(no charts)_")
    for name, frame in {**report.tables, **report.extra_tables}.items():
        shown = frame.reset_index() if any(n is not None for n in frame.index.names) else frame
        meta[f"table: {name}"] = markdown_table(shown, 15)
    return meta


def embedding_maps_asset(catalog: Catalog, spec: DatasetSpec) -> dg.AssetsDefinition:
    @dg.asset(key=[spec.name, "embedding_maps"], group_name=spec.name, kinds={"umap", "png"},
              partitions_def=model_partitions(catalog, spec), deps=[dg.AssetKey([spec.name, "image_embeddings"])],
              automation_condition=dg.AutomationCondition.eager(),
              description="UMAP (cosine) of the model's embeddings on an n_neighbors × min_dist grid, one PNG (and "
                          "SVG) grid per label level in maps/<model>/; large collections are subsampled with a "
                          "stated seed.")
    def embedding_maps(context: dg.AssetExecutionContext, storage: NfhmStorage) -> dg.MaterializeResult:
        model = context.partition_key
        table = storage.lake.read(spec.name, model)
        if table is None:
            raise StorageError(f"no embeddings for {spec.name}/{model}: materialize image_embeddings first")
        labels = label_arrays(read_manifest(storage, spec.name), table.image_ids, spec.labels)
        paths = draw_maps(spec.name, model, table.vectors, labels, spec.umap, spec.split.seed,
                          storage.data_path / "reports")
        return dg.MaterializeResult(metadata={
            "maps": {level: str(p) for level, p in paths.items()},
            **{f"preview: {level}": dg.MetadataValue.md(
                f"![umap {level}]({png_data_uri(p, max_width_px=560, max_bytes=60_000)})")
               for level, p in paths.items()},
            "grid": str(spec.umap),
        })

    return embedding_maps
