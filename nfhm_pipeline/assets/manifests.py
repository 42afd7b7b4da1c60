"""``<dataset>/image_manifest``: one row per usable image; unusable ones in ``rejected_images``."""

import dagster as dg

from nfhm_pipeline.assets.common import column_schema, manifest_path, markdown_table, write_parquet_atomic
from nfhm_pipeline.automation import SOURCE_FINGERPRINT_KEY, source_fingerprint
from nfhm_pipeline.catalog import DatasetSpec
from nfhm_pipeline.resources import NfhmStorage
from nfhm_pipeline.stages.manifests import build_manifest, warehouse_frames
from nfhm_pipeline.store import warehouse


def manifest_asset(spec: DatasetSpec) -> dg.AssetsDefinition:
    key = dg.AssetKey([spec.name, "image_manifest"])
    checks = [
        dg.AssetCheckSpec("image_ids_unique", asset=key, blocking=True,
                          description="No two manifest rows share an image_id (sha256 of the bytes)."),
        dg.AssetCheckSpec("labels_non_empty", asset=key, blocking=True,
                          description=f"Every image has a non-empty {spec.finest_label!r} label."),
        dg.AssetCheckSpec("no_image_listed_twice", asset=key, description="No file path appears twice."),
    ]

    @dg.asset(key=key, group_name=spec.name, kinds={"parquet", "duckdb"}, pool="duckdb_writer",
              check_specs=checks, description=f"Image manifest of {spec.name}: {spec.description}",
              automation_condition=dg.AutomationCondition.eager())
    def image_manifest(context: dg.AssetExecutionContext, storage: NfhmStorage) -> dg.MaterializeResult:
        build = build_manifest(spec, storage.subdir("sources"))
        m = build.manifest
        path = write_parquet_atomic(m, manifest_path(storage, spec.name))
        warehouse.replace_many(storage.warehouse_path, [
            (table, frame, {"dataset": spec.name})
            for table, frame in warehouse_frames(spec.name, build, spec.labels).items()], log_wait=context.log.info)
        if len(build.rejected):
            context.log.warning(f"{len(build.rejected)} image(s) rejected: "
                                f"{build.rejected['reason'].value_counts().to_dict()}")
        empty_labels = int(m[spec.finest_label].isna().sum() + (m[spec.finest_label] == "").sum())
        return dg.MaterializeResult(
            metadata={
                "dagster/row_count": len(m),
                "dagster/column_schema": column_schema(m),
                "path": dg.MetadataValue.path(str(path)),
                SOURCE_FINGERPRINT_KEY: source_fingerprint(spec),  # what the sensor compares on its first tick
                "rejected": len(build.rejected),
                "rejected_by_reason": build.rejected["reason"].value_counts().to_dict(),
                # distinct files read and decoded: rows listing a file again reuse its outcome
                "files_read": int(m.attrs.get("files_read", len(m))),
                "classes_per_level": build.classes_per_level(spec.labels),
                "preview": markdown_table(m.drop(columns=["image_id"]).assign(image_id=m["image_id"].str[:12]), 5),
            },
            check_results=[
                dg.AssetCheckResult(check_name="image_ids_unique", passed=bool(m["image_id"].is_unique),
                                    metadata={"duplicates": int(m["image_id"].duplicated().sum())}),
                dg.AssetCheckResult(check_name="labels_non_empty", passed=empty_labels == 0,
                                    metadata={"empty": empty_labels}),
                dg.AssetCheckResult(check_name="no_image_listed_twice", passed=bool(m["uri"].is_unique),
                                    metadata={"repeated_paths": int(m["uri"].duplicated().sum())}),
            ],
        )

    return image_manifest
