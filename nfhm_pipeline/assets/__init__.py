"""Thin Dagster assets. Each module builds one stage's asset(s) for a catalog dataset."""
from __future__ import annotations

import dagster as dg

from nfhm_pipeline.catalog import Catalog, DatasetSpec


def dataset_assets(catalog: Catalog, spec: DatasetSpec) -> list[dg.AssetsDefinition]:
    """Every asset of one dataset, keys prefixed by the dataset name."""
    from nfhm_pipeline.assets.embeddings import embeddings_asset, text_embeddings_asset
    from nfhm_pipeline.assets.evaluation import knn_metrics_asset, probe_metrics_asset, zero_shot_metrics_asset
    from nfhm_pipeline.assets.manifests import manifest_asset
    from nfhm_pipeline.assets.multilabel import alignment_head_asset, multilabel_metrics_asset
    from nfhm_pipeline.assets.reports import comparison_asset, embedding_maps_asset
    from nfhm_pipeline.assets.splits import splits_asset
    from nfhm_pipeline.stages.multilabel import evaluates_auc

    auc = [multilabel_metrics_asset(catalog, spec), alignment_head_asset(catalog, spec)] if evaluates_auc(spec) else []
    return [
        manifest_asset(spec),
        embeddings_asset(catalog, spec),
        text_embeddings_asset(catalog, spec),
        splits_asset(spec),
        knn_metrics_asset(catalog, spec),
        probe_metrics_asset(catalog, spec),
        zero_shot_metrics_asset(catalog, spec),
        embedding_maps_asset(catalog, spec),
        *auc,
        comparison_asset(spec),
    ]
