"""``<dataset>/embedding_maps``, per model: UMAP (cosine) of the model's embeddings on an
n_neighbors × min_dist grid (catalog ``umap``: the small default, ``{grid: seed}`` for seed 001's 10 × 5,
or explicit lists), one PNG (and SVG) grid per label level under ``reports/<dataset>/maps/<model>/``;
large collections are subsampled, stratified by the finest level and seeded by the dataset's ``seed``.
One exact cosine kNN graph feeds every fit; numba's compiled code is kept in ``<data_dir>/cache/numba``
(unless ``NUMBA_CACHE_DIR`` is set), so only the first process on a machine compiles UMAP."""
from __future__ import annotations

from nfhm_pipeline.stages.base import (
    Device, Log, Markdown, Paths, StageResult, quiet, read_embeddings, read_manifest, stage_seed,
)

DESCRIPTION = ("UMAP (cosine) of the model's embeddings on an n_neighbors × min_dist grid, one PNG (and SVG) grid "
               "per label level in maps/<model>/; large collections are subsampled, stratified by the finest "
               "level, with a stated seed.")


def run(dataset, model, paths: Paths, device: Device | None = None, *, run_id: str | None = None,
        log: Log = quiet) -> StageResult:
    from nfhm_pipeline.reports.comparison import draw_maps, label_arrays
    from nfhm_pipeline.reports.maps import use_numba_cache
    from nfhm_pipeline.reports.plots import png_data_uri

    numba_cache = use_numba_cache(paths.data_dir / "cache" / "numba")  # before umap is imported

    table = read_embeddings(paths, dataset.name, model.key)
    labels = label_arrays(read_manifest(paths, dataset.name), table.image_ids, dataset.labels)
    maps = draw_maps(dataset.name, model.key, table.vectors, labels, dataset.umap, stage_seed(dataset), paths.reports)
    return StageResult(metadata={
        "maps": {level: str(p) for level, p in maps.items()},
        **{f"preview: {level}": Markdown(f"![umap {level}]({png_data_uri(p, max_width_px=560, max_bytes=60_000)})")
           for level, p in maps.items()},
        "grid": str(dataset.umap), "seed": stage_seed(dataset), "numba cache": str(numba_cache),
    })
