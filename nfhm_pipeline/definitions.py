"""The Dagster code location: assets per catalog dataset, resources, schedules, sensors.

This module only composes; each asset module builds its assets from the catalog.
``NFHM_CATALOG`` picks the catalog (default ``demo``).
"""
from __future__ import annotations

import dagster as dg

from nfhm_pipeline.assets import dataset_assets
from nfhm_pipeline.automation import automation_defs
from nfhm_pipeline.catalog import Catalog, load_catalog
from nfhm_pipeline.resources import default_resources


def build_definitions(catalog: Catalog | None = None, resources: dict | None = None) -> dg.Definitions:
    catalog = catalog or load_catalog()
    resources = resources or default_resources()
    # A `ray_cluster` resource (NFHM_ENGINE=ray) puts the image embeddings on the ray engine.
    ray = "ray_cluster" in resources
    assets = [a for spec in catalog.datasets.values() for a in dataset_assets(catalog, spec, ray=ray)]
    schedules, sensors, jobs = automation_defs(catalog)
    return dg.Definitions(
        assets=assets, schedules=schedules, sensors=sensors, jobs=jobs,
        resources=resources,
    )


defs = build_definitions()
