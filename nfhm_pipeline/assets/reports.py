"""``<dataset>/model_comparison`` (all models side by side) and ``<dataset>/embedding_maps`` (UMAP per model)."""
import dagster as dg

from nfhm_pipeline.assets.common import markdown_table, read_manifest
from nfhm_pipeline.assets.embeddings import model_partitions
from nfhm_pipeline.catalog import Catalog, DatasetSpec
from nfhm_pipeline.errors import StorageError
from nfhm_pipeline.reports.plots import png_data_uri, save_png
from nfhm_pipeline.resources import NfhmStorage
from nfhm_pipeline.stages.reports import build_comparison, label_arrays
from nfhm_pipeline.store import warehouse

METRIC_STAGES = ("knn_metrics", "linear_probe_metrics", "zero_shot_metrics")


def auc_stages(spec: DatasetSpec) -> tuple[str, ...]:
    from nfhm_pipeline.stages.multilabel import evaluates_auc

    return ("multilabel_metrics", "alignment_head") if evaluates_auc(spec) else ()


def comparison_asset(spec: DatasetSpec) -> dg.AssetsDefinition:
    @dg.asset(key=[spec.name, "model_comparison"], group_name=spec.name, kinds={"duckdb", "html"},
              deps=[dg.AssetKey([spec.name, s]) for s in METRIC_STAGES + auc_stages(spec)],
              automation_condition=dg.AutomationCondition.on_cron("0 6 * * *"),
              description="Every model's results side by side: the seed's grouped bar charts per rule and level, "
                          "confusion matrix of the best model, probe and zero-shot tables, embedding speed, a "
                          "ranking summary, and one self-contained HTML report.")
    def model_comparison(storage: NfhmStorage) -> dg.MaterializeResult:
        db = storage.warehouse_path
        metrics = warehouse.read_table(db, "metrics", dataset=spec.name)
        if metrics.empty:
            raise StorageError(f"no metrics for {spec.name!r} yet: materialize its metric assets first")
        runs = warehouse.read_table(db, "embedding_runs", dataset=spec.name)
        predictions = warehouse.read_table(db, "predictions", dataset=spec.name)
        report = build_comparison(spec.name, spec.labels, metrics, runs, predictions,
                                  storage.subdir("reports", spec.name))
        # Small previews live in the event log; the full-size PNGs and the HTML report are on disk.
        previews = [f"![{name}]({png_data_uri(path, max_width_px=560, max_bytes=60_000)})"
                    for name, path in list(report.images.items())[:3]]
        return dg.MaterializeResult(metadata={
            "summary": dg.MetadataValue.md(report.summary_markdown),
            "charts": dg.MetadataValue.md("\n\n".join(previews) or "_(no charts)_"),
            "html_report": dg.MetadataValue.path(str(report.html)),
            "images": {name: str(path) for name, path in report.images.items()},
            **{f"table: {name}": markdown_table(frame, 15) for name, frame in list(report.tables.items())[:4]},
        })

    return model_comparison


def embedding_maps_asset(catalog: Catalog, spec: DatasetSpec) -> dg.AssetsDefinition:
    @dg.asset(key=[spec.name, "embedding_maps"], group_name=spec.name, kinds={"umap", "png"},
              partitions_def=model_partitions(catalog, spec), deps=[dg.AssetKey([spec.name, "image_embeddings"])],
              automation_condition=dg.AutomationCondition.eager(),
              description="UMAP (cosine) of the model's embeddings on an n_neighbors × min_dist grid, one PNG "
                          "grid per label level; large collections are subsampled with a stated seed.")
    def embedding_maps(context: dg.AssetExecutionContext, storage: NfhmStorage) -> dg.MaterializeResult:
        from nfhm_pipeline.reports.maps import umap_grid

        model = context.partition_key
        table = storage.lake.read(spec.name, model)
        if table is None:
            raise StorageError(f"no embeddings for {spec.name}/{model}: materialize image_embeddings first")
        labels = label_arrays(read_manifest(storage, spec.name), table.image_ids, spec.labels)
        grid = spec.umap
        figures = umap_grid(table.vectors, labels, n_neighbors=grid["n_neighbors"], min_dist=grid["min_dist"],
                            max_points=grid["max_points"], seed=spec.split.seed,
                            title_prefix=f"{spec.name} — {model}")
        out = storage.subdir("reports", spec.name, "maps")
        paths = {level: save_png(fig, out / f"umap_{model}_{level}.png") for level, fig in figures.items()}
        first = next(iter(paths.values()))
        return dg.MaterializeResult(metadata={
            "maps": {level: str(p) for level, p in paths.items()},
            "preview": dg.MetadataValue.md(f"![umap]({png_data_uri(first, max_width_px=560, max_bytes=80_000)})"),
            "grid": str(grid),
        })

    return embedding_maps
