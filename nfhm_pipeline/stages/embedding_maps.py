"""``<dataset>/embedding_maps``, per model: UMAP (cosine) of the model's embeddings on an
n_neighbors × min_dist grid, one PNG (and SVG) grid per label level under
``reports/<dataset>/maps/<model>/``; large collections are subsampled, seeded by the dataset's ``seed``."""
from __future__ import annotations

from nfhm_pipeline.stages.base import (
    Device, Log, Markdown, Paths, StageResult, quiet, read_embeddings, read_manifest, stage_seed,
)

DESCRIPTION = ("UMAP (cosine) of the model's embeddings on an n_neighbors × min_dist grid, one PNG (and SVG) grid "
               "per label level in maps/<model>/; large collections are subsampled with a stated seed.")


def run(dataset, model, paths: Paths, device: Device | None = None, *, run_id: str | None = None,
        log: Log = quiet) -> StageResult:
    from nfhm_pipeline.reports.comparison import draw_maps, label_arrays
    from nfhm_pipeline.reports.plots import png_data_uri

    table = read_embeddings(paths, dataset.name, model.key)
    labels = label_arrays(read_manifest(paths, dataset.name), table.image_ids, dataset.labels)
    maps = draw_maps(dataset.name, model.key, table.vectors, labels, dataset.umap, stage_seed(dataset), paths.reports)
    return StageResult(metadata={
        "maps": {level: str(p) for level, p in maps.items()},
        **{f"preview: {level}": Markdown(f"![umap {level}]({png_data_uri(p, max_width_px=560, max_bytes=60_000)})")
           for level, p in maps.items()},
        "grid": str(dataset.umap), "seed": stage_seed(dataset),
    })
