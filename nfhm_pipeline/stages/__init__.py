"""One module per asset, each the whole stage without Dagster.

Every module has ``run(dataset, model, paths, device, *, run_id=None, log=None) -> StageResult``
(see :mod:`nfhm_pipeline.stages.base`): it reads its inputs, calls the library, writes its
outputs (lake, warehouse, report files) and returns metadata and check outcomes. From a notebook::

    from nfhm_pipeline.catalog import load_catalog
    from nfhm_pipeline.stages import knn_metrics
    from nfhm_pipeline.stages.base import Device, Paths

    catalog = load_catalog("demo")
    result = knn_metrics.run(catalog.datasets["shapes"], catalog.models["tiny-clip"],
                             Paths.under("data"), Device("cpu"))
"""
