"""``<dataset>/image_manifest``: one row per usable image (Parquet), the unusable ones in
``rejected_images``, labels per level in ``images`` / ``image_labels`` (one transaction)."""
from __future__ import annotations

from nfhm_pipeline.stages.base import (
    CheckOutcome, CheckSpec, ColumnSchema, Device, Log, Paths, StageResult, markdown_table, quiet,
)

CHECKS = (
    CheckSpec("image_ids_unique", "No two manifest rows share an image_id (sha256 of the bytes).", blocking=True),
    CheckSpec("labels_non_empty", "Every image has a non-empty label at the finest level.", blocking=True),
    CheckSpec("no_image_listed_twice", "No file path appears twice."),
)


def describe(dataset) -> str:
    return f"Image manifest of {dataset.name}: {dataset.description}"


def run(dataset, model=None, paths: Paths | None = None, device: Device | None = None, *,
        run_id: str | None = None, log: Log = quiet) -> StageResult:
    from nfhm_pipeline.ingest.fingerprint import SOURCE_FINGERPRINT_KEY, source_fingerprint
    from nfhm_pipeline.ingest.manifest import build_manifest, warehouse_frames
    from nfhm_pipeline.store import warehouse
    from nfhm_pipeline.store.files import write_parquet

    build = build_manifest(dataset, paths.subdir("sources"))
    m = build.manifest
    path = write_parquet(m, paths.manifest(dataset.name))
    warehouse.replace_many(paths.warehouse, [
        (table, frame, {"dataset": dataset.name})
        for table, frame in warehouse_frames(dataset.name, build, dataset.labels).items()], log_wait=log)
    if len(build.rejected):
        log(f"{len(build.rejected)} image(s) rejected: {build.rejected['reason'].value_counts().to_dict()}")
    finest = dataset.finest_label
    empty_labels = int(m[finest].isna().sum() + (m[finest] == "").sum())
    return StageResult(
        metadata={
            "dagster/row_count": len(m),
            "dagster/column_schema": ColumnSchema.of(m),
            "path": path,
            SOURCE_FINGERPRINT_KEY: source_fingerprint(dataset),  # what the sensor compares on its first tick
            "rejected": len(build.rejected),
            "rejected_by_reason": build.rejected["reason"].value_counts().to_dict(),
            # distinct files read and decoded: rows listing a file again reuse its outcome
            "files_read": int(m.attrs.get("files_read", len(m))),
            "classes_per_level": build.classes_per_level(dataset.labels),
            "preview": markdown_table(m.drop(columns=["image_id"]).assign(image_id=m["image_id"].str[:12]), 5),
        },
        checks=[
            CheckOutcome("image_ids_unique", bool(m["image_id"].is_unique),
                         {"duplicates": int(m["image_id"].duplicated().sum())}),
            CheckOutcome("labels_non_empty", empty_labels == 0, {"empty": empty_labels, "level": finest}),
            CheckOutcome("no_image_listed_twice", bool(m["uri"].is_unique),
                         {"repeated_paths": int(m["uri"].duplicated().sum())}),
        ],
    )
