"""``<dataset>/splits``: one seeded, stratified train/test split (+ CV folds) shared by every model."""

import dagster as dg
import pandas as pd

from nfhm_pipeline.assets.common import read_manifest
from nfhm_pipeline.catalog import DatasetSpec
from nfhm_pipeline.evaluation.splits import check_split, make_split
from nfhm_pipeline.resources import NfhmStorage
from nfhm_pipeline.store import warehouse


def split_frames(spec: DatasetSpec, manifest: pd.DataFrame):
    """The split of a manifest and its warehouse tables ``splits`` and ``split_exclusions``."""
    has_official = manifest["official_split"].notna().any()
    frame = manifest[["image_id", spec.finest_label, "group", "official_split"]]
    result = make_split(
        frame, label_column=spec.finest_label, test_fraction=spec.split.test_fraction, seed=spec.split.seed,
        n_folds=spec.split.folds, group_column="group" if spec.split.grouped else None,
        official_split_column="official_split" if has_official else None,
    )
    labels = manifest.set_index("image_id")
    a = result.assignments
    splits = pd.DataFrame({
        "dataset": spec.name, "image_id": a["image_id"], "split": a["split"],
        "fold": a["fold"].astype("Int32"), "label": labels.loc[a["image_id"], spec.finest_label].to_numpy(),
        "grp": labels.loc[a["image_id"], "group"].to_numpy(),
    })
    d = result.dropped
    exclusions = pd.DataFrame({"dataset": spec.name, "image_id": d["image_id"], "label": d["label"], "reason": d["reason"]})
    return result, splits, exclusions


def splits_asset(spec: DatasetSpec) -> dg.AssetsDefinition:
    key = dg.AssetKey([spec.name, "splits"])
    checks = [dg.AssetCheckSpec("stratified_as_declared", asset=key, blocking=True,
                                description="Every class in test is in train; the test fraction is as declared.")]

    @dg.asset(key=key, group_name=spec.name, kinds={"duckdb"}, pool="duckdb_writer", check_specs=checks,
              deps=[dg.AssetKey([spec.name, "image_manifest"])], automation_condition=dg.AutomationCondition.eager(),
              description=f"Train/test split stratified by {spec.finest_label!r} (seed {spec.split.seed}), "
                          f"{spec.split.folds} CV folds over train; one split for every model so comparisons are paired.")
    def splits(storage: NfhmStorage) -> dg.MaterializeResult:
        manifest = read_manifest(storage, spec.name)
        result, frame, exclusions = split_frames(spec, manifest)
        warehouse.replace_rows(storage.warehouse_path, "splits", frame, dataset=spec.name)
        warehouse.replace_rows(storage.warehouse_path, "split_exclusions", exclusions, dataset=spec.name)
        expected = result.effective_test_fraction if result.mode == "stratified" else None
        problems = check_split(result.assignments, manifest.set_index("image_id")[spec.finest_label],
                               expected_test_fraction=expected)
        return dg.MaterializeResult(
            metadata={"dagster/row_count": len(frame), **result.summary(),
                      "excluded_classes": sorted(exclusions["label"].astype(str).unique().tolist())[:50]},
            check_results=[dg.AssetCheckResult(check_name="stratified_as_declared", passed=not problems,
                                               metadata={"problems": problems or ["none"]})],
        )

    return splits
